"""``trioproxy bench``: reproducible direct-vs-gateway benchmarks.

- ``loadgen``: the closed-loop trio client (raw sockets, ``http1`` parser) and its recorder;
- ``wire``: target addresses, the request bytes, the stream watcher (TTFT) [sans-IO];
- ``scenarios``: ``loadtest/scenarios/*.toml`` → :class:`~trioproxy.bench.scenarios.Scenario`;
- ``processes``: the mock, gateway and floor processes, pinned, always stopped;
- ``procstat``, ``probes``: CPU time, RSS and core load from ``/proc``, read beside each round;
- ``runner``: one scenario's interleaved rounds; ``report``, ``chart``: JSON, markdown, PNG;
- ``stats``, ``hotspots``: percentile math, py-spy profile summaries [sans-IO];
- ``cli``: ``add_arguments(parser)`` / ``run_from_args(args)`` for the ``bench`` subcommand.

See ``docs/benchmarks.md``.
"""
