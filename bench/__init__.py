"""glm-api benchmarks: the server against the same models run in-process, in the same run.

``python -m bench`` (or ``make bench``) runs these parts (``--only`` picks some), each against
servers it starts on free ports and stops:

* chat: tokens/s of one greedy gRPC stream against ``model.generate`` in this process, and the
  time to first token the server adds to a bare forward pass;
* embed: sentences/s of 32 concurrent one-sentence Embed calls against in-process ``encode``;
* streams: 1, 8 and 32 concurrent chat streams (aggregate and per-stream tokens/s, time to first
  token, memory), and the same workloads against OpenAI-compatible peers (``--peer``);
* envoy: JSON through Envoy against direct gRPC (latency, chat tokens/s).

Servers and in-process models share the machine's cores, so they never run at the same time:
runs are interleaved and medians compared. Every ratio comes from one run, because absolute
numbers on a shared machine drift from run to run. Targets are reported as PASS/FAIL, but the
exit status is 0 whatever they say. ``--json PATH`` writes every figure with the machine and the
date; ``python -m bench.report_md PATH`` turns that into docs/performance.md.
"""
