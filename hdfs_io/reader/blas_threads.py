"""numpy's BLAS in a process that reads: one thread, since a reader's parallelism is its worker processes.

OpenBLAS starts as many threads as the machine has cores in every process that loads numpy,
and a reader's one matrix product a record (the power spectrum onto the mel filterbank) uses
all of them. With k DataLoader workers, each with its decoding thread
(hdfs_io.reader.decode_ahead), that is k x cores spinning threads on the cores the workers
need. Measured on a 2-core machine, 5,000 utterances read with 2 workers: 18.3 s with
OpenBLAS's default of two threads, 4.8 s with one (bench/README.md, peers). torch does the same
for its own pool in DataLoader workers. torch's BLAS (MKL, linked in) is not this one.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def one_blas_thread() -> None:
    """Limits the BLAS libraries loaded in this process (numpy's OpenBLAS) to one thread, from now on."""
    threadpool_limits(limits=1, user_api="blas")
