"""Daily cellsynth regeneration: ingest -> train -> generate -> evaluate -> report -> optimize -> vacuum.

Each stage task calls the `cellsynth` CLI with `--quiet` (one status line, a line per skipped stage
saying why, no progress bars), so the same commands work in a worker with the image installed, and
with `--skip-unfed`, so the fixed task list also runs a traffic-only lake (no MDT reports): generate
and evaluate then succeed as skipped, saying why, as `cellsynth run` leaves them out. Stages whose
inputs did not change are skipped by the run registry, so a rerun after a partial failure redoes
only what is missing. The
tasks of one DAG run share a run id (Airflow's, made path-safe), retries included, so the lake's
`keep_runs` counts days, not tasks. The upkeep tasks compact small files (not a change: the next
run skips what only moved by compaction) and delete files no kept run needs (`lake.retention_hours`,
`lake.keep_runs`), so the lake does not grow with every day's regeneration.
Credentials reach the tasks through the worker's environment (a Kubernetes Secret or Airflow
connection exported as env vars); they are never put on the command line.

Airflow variables: `cellsynth_config` (default /etc/cellsynth/cluster.yaml).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow import DAG

try:  # Airflow 3 moved the operator to the standard provider
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

CONFIG = "{{ var.value.get('cellsynth_config', '/etc/cellsynth/cluster.yaml') }}"
STAGES = ("ingest", "train", "generate", "evaluate", "report")
UPKEEP = ("optimize", "vacuum")
# Airflow's run id (the same for every task and retry of one DAG run) without the ':' and '+' of its time.
RUN_ID = "{{ run_id | replace(':', '') | replace('+', '') }}"

default_args = {
    "owner": "cellsynth",
    "retries": 2,
    "retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(hours=6),
}

with DAG(
    dag_id="cellsynth_daily",
    description="Regenerate synthetic MDT and traffic from the operator lake",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # two runs on one lake would queue on its lock anyway
    default_args=default_args,
    tags=["cellsynth"],
) as dag:
    previous = None
    commands = [(stage, f"cellsynth {stage} --config {CONFIG} --run-id {RUN_ID} --quiet --skip-unfed") for stage in STAGES]
    commands += [(step, f"cellsynth {step} --config {CONFIG}") for step in UPKEEP]
    for task_id, command in commands:
        task = BashOperator(task_id=task_id, bash_command=command)
        if previous is not None:
            previous >> task
        previous = task
