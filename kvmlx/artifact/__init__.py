"""The artifact and its trust: the `.kvmlx` file format (preamble, header, aligned tensors), the KV
encodings, publisher signatures and the trust list, and the identity that binds KV to a model
(fingerprints, geometry, the binding check). Nothing here runs a model; everything above imports it.
"""
