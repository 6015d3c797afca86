"""The model server behind the gateway: the shared client, its state, and the simulator."""
