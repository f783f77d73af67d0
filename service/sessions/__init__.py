"""Sessions: records and leases, the store interface and its stores (in memory with SQLite snapshots,
Redis), the portable blob, and the calls that lease a session, run the engine from it and commit.

It sits after the engine in the flow: it imports the engine's request and event types, and the engine
knows nothing of it. A new store is one module here plus tests/session_store_contract.py.
"""
