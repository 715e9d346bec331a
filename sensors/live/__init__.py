"""edgefuse.sensors.live: live sources (MQTT, serial) and their transport helpers.

Each source implements one protocol (base.Source): open(), read(timeout),
close(), stats(), alive, wait_connected(timeout), last_error. Imports the
core only.
"""
