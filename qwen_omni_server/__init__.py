"""A multimodal inference server for Qwen2.5-Omni, in four layers with imports pointing one way:

- `core`: settings, request and result types, the engine and worker protocols, the conversation, audio and
  media decoding (no torch, no FastAPI);
- `api`: the HTTP server (FastAPI, no torch, no engine);
- `local`: the model in this process (torch); `upstream`: OpenAI-compatible servers behind this one;
- `ui`: the Gradio chat, a client of the API.

`server` puts them together: it picks the engine from ENGINE and serves it.
"""

__version__ = "0.1.0"
