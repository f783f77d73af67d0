"""The batching engine: one loop steps every running stream together. It knows nothing of HTTP or sessions.

Its face: `engine.Engine` (submit, cancel, snapshot) with `EngineConfig`; the requests and events in
`types` (`GenerationRequest`, `Token`, `Done`, the refusals' base `EngineError`); the models a server
serves and their engines in `pool` (`ModelPool`, `Catalog`); constrained output in `constraints`.
"""
