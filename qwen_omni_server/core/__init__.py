"""Settings, request and result types, protocols, the conversation, audio and media: no torch, no FastAPI."""
