"""The routes, one router per API: `/multimodal`, `/v1`, and the operational `/`, `/health`, `/metrics`."""
