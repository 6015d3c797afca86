"""Engines behind the gateway: one supervised model server (spec, command, supervisor, probe channel,
state) or an external upstream that explains itself (its watch)."""
