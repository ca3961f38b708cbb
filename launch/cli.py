"""`python -m launch slurm ... -- COMMAND`."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from trainer.errors import OneLineParser, run_cli

from . import slurm


def parser() -> OneLineParser:
    p = OneLineParser(prog="python -m launch", description="Run the trainer on Slurm, on several hosts "
                      "with horovodrun, or as federated rounds.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("slurm", help="render, submit and (with --wait) follow an sbatch job",
                       description="python -m launch slurm --nodes N --tasks-per-node T [--wait] -- python -m trainer ...")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--tasks-per-node", type=int, default=1, help="ranks per node (one per GPU on GPU nodes)")
    s.add_argument("--gpus-per-node", type=int, default=0)
    s.add_argument("--partition")
    s.add_argument("--time", help="wall-clock limit, [D-]HH:MM:SS")
    s.add_argument("--job-name", default="dptoolkit")
    s.add_argument("--mode", default="srun", choices=slurm.MODES,
                   help="srun: srun --mpi=pmix (Horovod over MPI, or --backend multiworker); "
                        "horovodrun: horovodrun --gloo over the allocation's hosts")
    s.add_argument("--output", default="slurm-%j.out", help="job log (sbatch --output pattern)")
    s.add_argument("--workdir", default=".", help="the job's working directory (default: here)")
    s.add_argument("--wait", action="store_true", help="follow the job, stream its log, exit with its status")
    s.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    s.add_argument("cmd", nargs="*", help="the command, after --")

    h = sub.add_parser("horovod", help="horovodrun on several hosts",
                       description="python -m launch horovod -H host1:4,host2:4 -- python -m trainer ... "
                       "Every host needs the same environment at the same path, and passwordless ssh from this "
                       "one; hosts that resolve to this machine are started without ssh.")
    where = h.add_mutually_exclusive_group(required=True)
    where.add_argument("-H", "--hosts", help="host:slots[,host:slots...]")
    where.add_argument("--hostfile", help="lines of 'host slots=N'")
    h.add_argument("--np", type=int, help="ranks (default: all slots)")
    h.add_argument("--controller", default="gloo", choices=("gloo", "mpi"))
    h.add_argument("--ssh-port", type=int)
    h.add_argument("--print", action="store_true", help="print the horovodrun command, run nothing")
    h.add_argument("cmd", nargs="*", help="the command, after --")

    f = sub.add_parser("federated", help="rounds of local training and FedAvg",
                       description="Each round, every client trains from the global checkpoint on its own "
                       "share, then merge fedavg makes the next global checkpoint. Extra trainer flags go after --.")
    f.add_argument("--clients", type=int, required=True)
    f.add_argument("--rounds", type=int, required=True)
    f.add_argument("--local-epochs", type=int, default=1)
    f.add_argument("--split", default="iid", help="iid | dirichlet:ALPHA | classes:C")
    f.add_argument("--out", required=True, help="a new directory: init/, round-NNN/client-K/, round-NNN/global/")
    f.add_argument("--model", default="digits_cnn")
    f.add_argument("--data", default="digits")
    f.add_argument("--data-dir")
    f.add_argument("--seed", type=int, default=0, help="seed of the split and the init")
    f.add_argument("--init", help="start from this checkpoint instead of a fresh init")
    f.add_argument("--np", type=int, default=1, help="ranks per client (horovodrun --gloo inside each client)")
    f.add_argument("--aggregator", default="mean", help="merge fedavg --aggregator: mean | median | "
                   "trimmed-mean:BETA | krum:F")
    f.add_argument("--server-opt", choices=("fedavgm", "fedadam", "fedyogi"),
                   help="a server optimizer on each round's average (default: the average is the new global)")
    f.add_argument("--server-lr", type=float, default=1.0, help="step size of --server-opt (default 1)")
    f.add_argument("--algorithm", default="fedavg", help="fedavg | fedprox (clients add mu/2 ||w - w_global||^2) "
                   "| scaffold (control variates against client drift; merge scaffold) (default fedavg)")
    f.add_argument("--prox-mu", type=float, help="fedprox: mu (default 0.01)")
    f.add_argument("--clients-per-round", type=int, metavar="K",
                   help="sample K clients per round, seeded by --seed and the round (default: all)")
    f.add_argument("--simulate", action="store_true",
                   help="train every client in this process, one TensorFlow runtime, weights swapped in and out; "
                        "writes the globals, not the client runs")
    f.add_argument("--lr-decay", type=float, default=1.0, metavar="GAMMA",
                   help="clients train round r at --lr x GAMMA^(r-1), a local learning-rate schedule "
                        "(default 1: constant)")
    f.add_argument("--quiet", action="store_true")
    f.add_argument("cmd", nargs="*", help="extra trainer flags, after --")
    return p


def cmd_slurm(a) -> int:
    job = slurm.Job(command=a.cmd, nodes=a.nodes, tasks_per_node=a.tasks_per_node,
                    gpus_per_node=a.gpus_per_node, partition=a.partition, time=a.time, mode=a.mode,
                    job_name=a.job_name, output=a.output, workdir=a.workdir)
    script = slurm.render(job)
    if a.dry_run:
        print(script, end="")
        return 0
    job_id = slurm.submit(script, a.workdir)
    print(f"submitted job {job_id} ({job.tasks} tasks on {job.nodes} node(s), {job.mode})", flush=True)
    if not a.wait:
        return 0
    log = Path(a.workdir) / a.output.replace("%j", str(job_id)) if "%" not in a.output.replace("%j", "") else None
    try:
        status = slurm.follow(job_id, log)
    except slurm.ControllerUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
    from .federated import Plan, format_table, run
    plan = Plan(out=Path(a.out), clients=a.clients, rounds=a.rounds, local_epochs=a.local_epochs, split=a.split,
                model=a.model, data=a.data, data_dir=a.data_dir, seed=a.seed, np=a.np, init=a.init,
                aggregator=a.aggregator, server_opt=a.server_opt, server_lr=a.server_lr,
                trainer_args=a.cmd, quiet=a.quiet, algorithm=a.algorithm, prox_mu=a.prox_mu,
                clients_per_round=a.clients_per_round, simulate=a.simulate, lr_decay=a.lr_decay)
    try:
        rows = run(plan, log=lambda line: print(line, flush=True))
    except RuntimeError as e:  # a client or merge failed: its own message says why
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(rows))
    print(f"wrote {plan.out / 'rounds.csv'} and {plan.out / 'rounds.png'}")
    return 0


COMMANDS = {"slurm": cmd_slurm, "horovod": cmd_horovod, "federated": cmd_federated}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def body():
        # Everything after `--` is the job's command, flags included.
        cmd = argv[argv.index("--") + 1:] if "--" in argv else []
        head = argv[:argv.index("--")] if "--" in argv else argv
        args = parser().parse_args(head)
        args.cmd = cmd or getattr(args, "cmd", [])
        return COMMANDS[args.command](args)
    return run_cli(body)
