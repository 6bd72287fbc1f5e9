"""
picochat's server: `picochat serve` (picochat/stages/serve.py) runs it.

  api.py        the OpenAI chat-completions schema: validation, limits, reply shapes
  app.py        the FastAPI app: endpoints, API key, errors, Prometheus metrics
  static/       the web chat page served at /

The continuous-batching scheduler it runs on is picochat/scheduler.py (chat_eval uses it too).
docs/SERVING.md is the user's guide.
"""
