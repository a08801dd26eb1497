"""numpy's BLAS in a process that reads: one thread, since a reader's parallelism is its worker processes.

OpenBLAS starts as many threads as the machine has cores in every process that loads numpy,
and a reader's one matrix product a record (the power spectrum onto the mel filterbank) uses
all of them. With k DataLoader workers, each with its decoding thread
(hdfs_io.reader.decode_ahead), that is k x cores spinning threads on the cores the workers
need. Measured on a 2-core machine, 5,000 utterances read with 2 workers: 18.3 s with
OpenBLAS's default of two threads, 4.9 s with one (bench/README.md, peers). torch does the same
for its own pool in DataLoader workers.

The limit holds for the rest of the process, so a trainer that reads in-process (no workers)
keeps it too. It is set on OpenBLAS only: pip's torch links its own MKL, which this leaves
alone, and so is an MKL that a conda numpy shares with torch.
"""

from __future__ import annotations

from threadpoolctl import ThreadpoolController


def one_blas_thread() -> None:
    """Limits the OpenBLAS libraries loaded in this process (numpy's) to one thread, from now on."""
    ThreadpoolController().select(internal_api="openblas").limit(limits=1)
