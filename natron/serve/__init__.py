"""Serving: FastAPI REST + WebSocket over `natron.predictor.Predictor` (see natron/serve/app.py)."""
from natron.serve.app import MicroBatcher, ServeSettings, create_app, run_phase
from natron.serve.schemas import InvalidRequest

__all__ = ['InvalidRequest', 'MicroBatcher', 'ServeSettings', 'create_app', 'run_phase']
