"""edgefuse.sensors.live: live sources (MQTT, serial) and their transport helpers.

Each source implements one protocol (base.Source): name, open(),
read(timeout_s), close(), stats(), alive, wait_connected(timeout_s),
last_error; sensors.live.factory builds them from the settings. Imports the
core only.
"""
