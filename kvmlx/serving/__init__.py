"""Serving over HTTP: the OpenAI-compatible provider that answers from hosted KV (engine + HTTP
layer), and the artifact distribution side (artifact server with ranges, entitlement tokens and
metering, the resumable fetch client, Hugging Face Hub push/pull). Built on `runtime/`.
"""
