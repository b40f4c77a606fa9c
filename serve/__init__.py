"""fluxrt's images service: OpenAI's images API over one pipeline (``fluxrt serve``), and its Ray Serve
deployment.  Stands on the runtime; needs the ``serve`` extra (FastAPI, uvicorn, prometheus_client; Ray Serve
for ``ray_app``)."""
