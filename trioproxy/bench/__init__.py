"""``trioproxy bench``: reproducible direct-vs-gateway benchmarks.

- ``loadgen``: the closed-loop trio client (raw sockets, ``http1`` parser) and its recorder;
- ``scenarios``: ``loadtest/scenarios/*.toml`` → :class:`~trioproxy.bench.scenarios.Scenario`;
- ``processes``: the mock, gateway and floor processes, pinned, always stopped;
- ``procstat``: CPU time and RSS from ``/proc``;
- ``runner``: one scenario's interleaved rounds; ``report``: JSON, markdown, PNG;
- ``stats``, ``hotspots``: percentile math, py-spy profile summaries;
- ``cli``: ``add_arguments(parser)`` / ``run_from_args(args)`` for the ``bench`` subcommand.

See ``docs/benchmarks.md``.
"""
