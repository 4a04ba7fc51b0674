"""Nissa: what a run reports while it trains, and the evidence it leaves behind.

- ``metrics``: the run's Prometheus metrics (private registry) and their HTTP endpoint;
- ``anomaly``: detection of loss spikes, stalls, failing compiles and memory growth;
- ``run``: ``RunTelemetry``, the one object the trainer's hooks call;
- ``jsonl``: the run directory's metrics stream and hash-chained event log;
- ``events``: the event-store interfaces (run directory now, asset repository later);
- ``audit``: verification of an event chain and of the recipe a run recorded;
- ``report``: ``esper report``'s Markdown, HTML and JSON.
"""
