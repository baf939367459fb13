"""``detdistill sweep``: which distillation method suits a teacher/student pair, measured.

One teacher (trained once, or the given checkpoint), the student alone, and the
student with each method, over several seeds; then a table with the spread over
seeds, the gain over the student alone and the share of the teacher-student gap
closed, and how far the ranking can be trusted. The work is split by job:

* :mod:`detdistill.sweep.plan`: which runs, with which configs (and the checks
  that make a bad method name or a method the pair cannot use a one-line error
  before anything trains);
* :mod:`detdistill.sweep.execute`: training them, resumably, in local processes
  (one thread or one GPU each) or on a Ray cluster;
* :mod:`detdistill.sweep.table`: the statistics, the table, the chart and the
  best row's config;
* :mod:`detdistill.sweep.command`: the ``detdistill sweep`` subcommand.
"""

from detdistill.sweep.execute import run_job, run_sweep
from detdistill.sweep.plan import Job, Row, SweepError, SweepPlan, parse_row, plan_sweep
from detdistill.sweep.table import rank, summarise

__all__ = [
    "Job",
    "Row",
    "SweepError",
    "SweepPlan",
    "parse_row",
    "plan_sweep",
    "rank",
    "run_job",
    "run_sweep",
    "summarise",
]
