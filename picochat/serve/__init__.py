"""
picochat's server: `picochat serve` (picochat/stages/serve.py) runs it.

  scheduler.py  continuous batching: one thread per engine, requests join and leave between steps
  api.py        the OpenAI chat-completions schema: validation, limits, reply shapes
  app.py        the FastAPI app: endpoints, API key, errors, Prometheus metrics
  static/       the web chat page served at /

docs/SERVING.md is the user's guide.
"""
