"""Fairness between clients: who gets the next free row, and who may queue more.

**Rows: the Virtual Token Counter** ("Fairness in Serving Large Language Models", Sheng et al., OSDI
2024). Each client has a counter of the service it has received, divided by its weight: characters
generated, and prompt characters ingested at `prompt_cost` of a generated one each (a prompt character
goes in a block of several rows at once, a generated one is a row of a step). A free row goes to a
waiting stream of the backlogged client with the smallest counter. A client that becomes backlogged
(a first stream waiting) is lifted to the smallest counter among the clients already backlogged, if its
own is smaller, so time spent idle is not banked as credit. Within one client the scheduler keeps its
order: the client's requests' lines round robin, each within its request's row cap.

**The queue: shares.** The engine bounds the requests running or waiting (`max_batch_size + max_queue`).
When that bound is reached, a client may still submit while it holds fewer than its share of the bound
(the bound times its weight over the weights of every client with requests in the engine, its own
included): a flood from one client fills the queue, and the next client is still let in, while the
flooding client gets 429 until it is back within its share. The bound can therefore be passed, by
clients within their shares, up to twice the bound at the most.

The counters are this process's own: replicas behind a load balancer each keep theirs (README).
"""

from __future__ import annotations

from .types import Client

MAX_COUNTERS = 10_000  # above this, counters of clients with nothing waiting that the lift would raise anyway go


class ServiceCounters:
    """The virtual token counters, kept by the engine thread."""

    def __init__(self, prompt_cost: float = 0.5):
        self.prompt_cost = prompt_cost
        self.counters: dict[str, float] = {}

    def of(self, client: Client) -> float:
        return self.counters.get(client.id, 0.0)

    def lift(self, client: Client, backlogged: list[Client]) -> None:
        """`client` has a first stream waiting: no lower than the least served of those already waiting."""
        if backlogged:
            floor = min(self.of(c) for c in backlogged)
            if self.of(client) < floor:
                self.counters[client.id] = floor
        if len(self.counters) > MAX_COUNTERS:
            floor = min((self.of(c) for c in backlogged), default=float("inf"))
            waiting = {c.id for c in backlogged} | {client.id}
            self.counters = {k: v for k, v in self.counters.items() if k in waiting or v > floor}

    def served(self, client: Client, generated: int = 0, prompt: int = 0) -> None:
        """Add the service `client` received: characters generated, prompt characters ingested."""
        if generated or prompt:
            self.counters[client.id] = self.of(client) + (generated + self.prompt_cost * prompt) / client.weight


def queue_share(bound: int, client: Client, weights_in: dict[str, float]) -> float:
    """A client's share of the queue bound: the bound times its weight over the weights of every client
    with requests in the engine (`weights_in`: id -> weight), its own included."""
    total = sum(w for cid, w in weights_in.items() if cid != client.id) + client.weight
    return bound * client.weight / total
