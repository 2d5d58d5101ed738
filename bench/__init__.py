"""glm-api benchmarks: the server against the same models run in-process, in the same run.

``python -m bench`` (or ``make bench``) starts ``python -m server`` as a child process on a free
port, loads the same chat and embedding models in the benchmark's own process, and compares them:

* chat: tokens/s of one greedy gRPC stream vs ``model.generate``, and the time to first token the
  server adds to a bare forward pass;
* embed: sentences/s of 32 concurrent one-sentence Embed calls vs ``SentenceTransformer.encode``
  at batch 32 (and batch 1, for context);
* memory: the peak resident set of the server process with the default models.

The server and the in-process models share the machine's cores, so they never run at the same
time: runs are interleaved (in-process, server, in-process, server, ...) and medians compared.
Every ratio comes from one run, because absolute numbers on a shared machine drift from run to
run. Targets are reported as PASS/FAIL, but the exit status is 0 whatever they say.
"""
