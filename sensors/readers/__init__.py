"""edgefuse.sensors.readers: recorded inputs as chunks.

MCAP logs, WAV/CSV, the goodvibes and sp-sw-har layouts, and the merger of
several inputs in time order. Imports the core only; used by replay, the
daemon's recorder and the training side alike (one reader per format).
"""
