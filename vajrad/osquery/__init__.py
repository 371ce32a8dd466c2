"""The bundled osquery extension: Vajra's tables inside osquery and Fleet."""
