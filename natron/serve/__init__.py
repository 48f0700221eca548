"""Serving: FastAPI REST + WebSocket (app.py) over the bucketed engine `natron.serve.engine.ServingPredictor`."""
from natron.serve.app import MicroBatcher, ServeSettings, create_app, run_phase
from natron.serve.schemas import InvalidRequest

__all__ = ['InvalidRequest', 'MicroBatcher', 'ServeSettings', 'create_app', 'run_phase']
