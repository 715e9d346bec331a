"""edgefuse.runtime.service: what runs the core as a service or a command.

The daemon (``edgefuse run``), its config, sinks and outbox, metrics and
health, replay and simulate. Imports the core, the readers and the live
sources; nothing below imports it.
"""
