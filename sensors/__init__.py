"""edgefuse.sensors: where chunks come from.

``edgefuse.sensors.readers``: recorded inputs (MCAP, WAV/CSV, goodvibes, sp-sw-har).
``edgefuse.sensors.live``: live sources (MQTT, serial).
"""
