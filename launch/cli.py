"""`python -m launch slurm ... -- COMMAND`."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from trainer.errors import OneLineParser, UsageError, run_cli

from . import slurm


def parser() -> OneLineParser:
    p = OneLineParser(prog="python -m launch", description="Run the trainer on Slurm, on several hosts "
                      "with horovodrun, or as federated rounds.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("slurm", help="render, submit and (with --wait) follow an sbatch job", allow_abbrev=False,
                       description="python -m launch slurm --nodes N --tasks-per-node T [--wait] -- python -m trainer "
                       "... The trainer's own flags, its --out included, go after --. Every value that goes into "
                       "an #SBATCH line is checked first; anything unsafe exits 2 and nothing is submitted.")
    s.add_argument("--nodes", type=int, default=1, help="nodes to allocate (default 1)")
    s.add_argument("--tasks-per-node", type=int, default=1, help="ranks per node, one per GPU on GPU nodes "
                   "(default 1)")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0: none asked for)")
    s.add_argument("--cpus-per-task", type=int, help="cores per rank, >= 1 (default: the cluster's, usually 1)")
    s.add_argument("--mem", help="memory per node: 4000M, 16G, 1T (a number alone is megabytes; 0 is all of it) "
                   "(default: the cluster's)")
    s.add_argument("--partition", help="partition, or several separated by commas (default: the cluster's)")
    s.add_argument("--account", help="account to charge (default: your default account)")
    s.add_argument("--qos", help="quality of service (default: the account's)")
    s.add_argument("--constraint", help="node features, e.g. a100 or 'intel&ib' (default: any node)")
    s.add_argument("--exclusive", action="store_true", help="no other job on the nodes (default: shared)")
    s.add_argument("--time", help="wall-clock limit, [D-]HH:MM:SS or MM (default: the partition's)")
    s.add_argument("--requeue", action="store_true",
                   help="before the time limit (--signal) stop the trainer at its last checkpoint, requeue the "
                        "job, and continue its --out with --resume when it starts again; repeats until the command "
                        "ends (default off)")
    s.add_argument("--signal", metavar="[SIG@]SECONDS",
                   help=f"with --requeue: USR1 or USR2, and how many seconds before the time limit; Slurm sends it "
                        f"up to 30 s earlier (default {slurm.DEFAULT_SIGNAL})")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="--NAME[=VALUE]",
                   help="any other sbatch option, as an #SBATCH line; repeatable, e.g. "
                        "--sbatch-arg=--mail-type=END (default none)")
    s.add_argument("--job-name", default="dptoolkit", help="job name (default dptoolkit)")
    s.add_argument("--mode", default="srun", choices=slurm.MODES,
                   help="srun: srun --mpi=pmix (Horovod over MPI, or --backend multiworker); "
                        "horovodrun: horovodrun --gloo over the allocation's hosts (default srun)")
    s.add_argument("--log", metavar="PATTERN", help="the job's log, sbatch's --output pattern; %%j is the job id "
                   "(default slurm-%%j.out)")
    s.add_argument("--output", metavar="PATTERN", help="deprecated alias of --log (default: --log's)")
    s.add_argument("--workdir", default=".", help="the job's working directory (default: here)")
    s.add_argument("--wait", action="store_true", help="follow the job through requeues to its end, stream its "
                   "log, exit with its status (default: return once submitted)")
    s.add_argument("--dry-run", action="store_true", help="print the script, submit nothing (default off)")
    s.add_argument("cmd", nargs="*", help="the command, after -- (required)")

    h = sub.add_parser("horovod", help="horovodrun on several hosts",
                       description="python -m launch horovod -H host1:4,host2:4 -- python -m trainer ... "
                       "Every host needs the same environment at the same path, and passwordless ssh from this "
                       "one; hosts that resolve to this machine are started without ssh.")
    where = h.add_mutually_exclusive_group(required=True)
    where.add_argument("-H", "--hosts", help="host:slots[,host:slots...] (this or --hostfile is required)")
    where.add_argument("--hostfile", help="a file of 'host slots=N' lines (this or -H is required)")
    h.add_argument("--np", type=int, help="ranks (default: every slot)")
    h.add_argument("--controller", default="gloo", choices=("gloo", "mpi"), help="gloo: horovodrun --gloo over "
                   "ssh; mpi: horovodrun --mpi, OpenMPI's mpirun (default gloo)")
    h.add_argument("--ssh-port", type=int, help="ssh port of the other hosts (default: ssh's, usually 22)")
    h.add_argument("--print", action="store_true", help="print the horovodrun command, run nothing (default off)")
    h.add_argument("cmd", nargs="*", help="the command, after -- (required)")

    f = sub.add_parser("federated", help="rounds of local training and FedAvg",
                       description="Each round, every client trains from the global checkpoint on its own "
                       "share, then merge fedavg makes the next global checkpoint. Extra trainer flags go after --; "
                       "those launch sets for every client (--epochs, --seed, --model, --data, ...) are refused "
                       "there. --resume continues an interrupted run from its last complete round.")
    f.add_argument("--clients", type=int, required=True,
                   help="number of clients the data is split among, 2 or more (required)")
    f.add_argument("--rounds", type=int, required=True,
                   help="rounds to train (required); with --resume it may grow, to train on")
    f.add_argument("--local-epochs", type=int, default=1, help="epochs each client trains per round (default 1)")
    f.add_argument("--split", default="iid", help="iid | dirichlet:ALPHA | classes:C (default iid)")
    f.add_argument("-o", "--out", required=True,
                   help="the run's directory (required): plan.json, init/, round-NNN/{client-K,global}/, "
                        "round-NNN/*.log, rounds.csv, rounds.png; new unless --resume")
    f.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last complete round; the other flags must be those "
                        "it was started with (--rounds may grow) (default off: --out must be new or empty)")
    f.add_argument("--model", default="digits_cnn", help="model of the fresh init (default digits_cnn; "
                   "with --init, the init's)")
    f.add_argument("--data", default="digits", help="digits | cifar10 | synthetic | PATH.npz (default digits)")
    f.add_argument("--data-dir", help="directory holding cifar-10-batches-py or -bin (default: none)")
    f.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the init, the client sampling and each client's seed (default 0)")
    f.add_argument("--init", help="start from this checkpoint (default: a fresh `trainer init` in OUT/init)")
    f.add_argument("--np", type=int, default=1, help="ranks per client, horovodrun --gloo inside each client "
                   "(default 1)")
    f.add_argument("--aggregator", default="mean", help="merge fedavg --aggregator: mean | median | "
                   "trimmed-mean:BETA | krum:F (default mean)")
    f.add_argument("--server-opt", choices=("fedavgm", "fedadam", "fedyogi"),
                   help="a server optimizer on each round's average (default none: the average is the new global)")
    f.add_argument("--server-lr", type=float, default=1.0, help="step size of --server-opt (default 1)")
    f.add_argument("--algorithm", default="fedavg", help="fedavg | fedprox (clients add mu/2 ||w - w_global||^2) "
                   "| scaffold (control variates against client drift; merge scaffold) (default fedavg)")
    f.add_argument("--prox-mu", type=float, help="fedprox: mu (default 0.01)")
    f.add_argument("--clients-per-round", type=int, metavar="K",
                   help="sample K (2 or more) clients per round, seeded by --seed and the round (default: all)")
    f.add_argument("--simulate", action="store_true",
                   help="train every client in this process, one TensorFlow runtime, weights swapped in and out; "
                        "writes the globals, not the client runs (default: a process per client)")
    f.add_argument("--lr-decay", type=float, default=1.0, metavar="GAMMA",
                   help="clients train round r at --lr x GAMMA^(r-1), a local learning-rate schedule "
                        "(default 1: constant)")
    f.add_argument("--json", action="store_true",
                   help="print one JSON document of the rounds on stdout and nothing else there; progress lines "
                        "go to stderr (default off: a table on stdout)")
    f.add_argument("--quiet", action="store_true",
                   help="no progress lines (default off: a line per client and per round)")
    f.add_argument("cmd", nargs="*", help="extra trainer flags, after -- (default none)")
    return p


def cmd_slurm(a) -> int:
    log, log_flag = a.log, "--log"
    if a.output is not None:
        print("warning: --output is deprecated; use --log", file=sys.stderr, flush=True)
        if a.log is not None and a.log != a.output:
            raise UsageError(f"--output {a.output} and --log {a.log}: --output is --log's old name; give only --log")
        log, log_flag = a.output, "--output"
    job = slurm.Job(command=a.cmd, nodes=a.nodes, tasks_per_node=a.tasks_per_node,
                    gpus_per_node=a.gpus_per_node, partition=a.partition, time=a.time, mode=a.mode,
                    job_name=a.job_name, log=log or "slurm-%j.out", log_flag=log_flag, workdir=a.workdir,
                    account=a.account, qos=a.qos, mem=a.mem, cpus_per_task=a.cpus_per_task,
                    constraint=a.constraint, exclusive=a.exclusive, sbatch_args=a.sbatch_arg,
                    requeue=a.requeue, signal=a.signal)
    script = slurm.render(job)
    if a.dry_run:
        print(script, end="")
        return 0
    job_id = slurm.submit(script, a.workdir)
    print(f"submitted job {job_id} ({job.tasks} tasks on {job.nodes} node(s), {job.mode})", flush=True)
    if not a.wait:
        return 0
    log = Path(a.workdir) / job.log.replace("%j", str(job_id)) if "%" not in job.log.replace("%j", "") else None
    try:
        status = slurm.follow(job_id, log)
    except slurm.ControllerUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Stopping the follower leaves the job to Slurm: it may be hours into
        # its allocation, and --wait is only a view of it.
        print(f"stopped following job {job_id}; it keeps running (scancel {job_id} stops it)", file=sys.stderr)
        raise
    if status is None:
        print(f"job {job_id} ended, but its exit status is unknown: scontrol has forgotten the job and sacct has "
              f"no record of it (no accounting); see its log", file=sys.stderr)
        return 1
    print(f"job {job_id} ended with exit status {status}", file=sys.stderr)
    return status


def cmd_horovod(a) -> int:
    from .horovod import horovodrun_command, rank_hosts, run
    from .hosts import parse_hosts, read_hostfile
    hosts = parse_hosts(a.hosts) if a.hosts is not None else read_hostfile(a.hostfile)
    cmd = horovodrun_command(hosts, a.cmd, a.np, a.controller, a.ssh_port)
    print(shlex.join(cmd), flush=True)
    return 0 if a.print else run(cmd, rank_hosts(hosts, a.np))


def cmd_federated(a) -> int:
    import json

    from .federated import Plan, run
    from .rounds import complete_records, csv_row, format_table
    plan = Plan(out=Path(a.out), clients=a.clients, rounds=a.rounds, local_epochs=a.local_epochs, split=a.split,
                model=a.model, data=a.data, data_dir=a.data_dir, seed=a.seed, np=a.np, init=a.init,
                aggregator=a.aggregator, server_opt=a.server_opt, server_lr=a.server_lr,
                trainer_args=a.cmd, quiet=a.quiet, algorithm=a.algorithm, prox_mu=a.prox_mu,
                clients_per_round=a.clients_per_round, simulate=a.simulate, lr_decay=a.lr_decay, resume=a.resume)
    # With --json, stdout carries the document alone: progress goes to stderr.
    progress = sys.stderr if a.json else sys.stdout

    def document(records, **status) -> str:  # paths as given, not relative to --out
        rounds = [{**r, "global": str(plan.out / r["global"])} for r in records]
        return json.dumps({"out": str(plan.out), **status, "rounds": rounds}, indent=2)
    try:
        records = run(plan, log=lambda line: print(line, file=progress, flush=True))
    except RuntimeError as e:  # a client or merge failed: its own message says why, and names its log
        if a.json:
            print(document(complete_records(plan.out), complete=False, error=str(e)))
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(document(records, complete=True))
        return 0
    print(format_table([csv_row(r, plan.per_round == plan.clients) for r in records]))
    print(f"wrote {plan.out / 'rounds.csv'} and {plan.out / 'rounds.png'}")
    return 0


COMMANDS = {"slurm": cmd_slurm, "horovod": cmd_horovod, "federated": cmd_federated}


def _slurm_head(head: list[str]) -> list[str]:
    """`--sbatch-arg --mail-type=END` as `--sbatch-arg=--mail-type=END`:
    argparse would take a value that starts with -- for a flag of its own."""
    out = []
    for word in head:
        if out and out[-1] == "--sbatch-arg":
            out[-1] = f"--sbatch-arg={word}"
            continue
        if word in ("-o", "--out") or word.startswith(("--out=", "-o")) and not word.startswith("--output"):
            raise UsageError(f"{word}: launch slurm has no such flag; the trainer's --out RUN_DIR goes after --, "
                             f"and the job's log is --log")
        out.append(word)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def body():
        # Everything after `--` is the job's command, flags included.
        cmd = argv[argv.index("--") + 1:] if "--" in argv else []
        head = argv[:argv.index("--")] if "--" in argv else argv
        args = parser().parse_args(_slurm_head(head) if head[:1] == ["slurm"] else head)
        args.cmd = cmd or getattr(args, "cmd", [])
        return COMMANDS[args.command](args)
    return run_cli(body, "launch")
