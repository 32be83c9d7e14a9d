import os
import sys

# Tests are tiny; XLA's thread pools only add contention on 2-core CI.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")
sys.path.insert(0, os.path.dirname(__file__))
