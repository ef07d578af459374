"""Persistence: the SQLite recorder and the readers of stores and saved Traces."""

from .store import Recorder, StoreError, load, load_findings, load_store

__all__ = ["Recorder", "StoreError", "load", "load_findings", "load_store"]
