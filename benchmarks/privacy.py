"""DP-SGD on a silo's SLM, silo-only: accuracy, membership-inference audit and time, without DP and
at each ε, on the real offline models and data. Each figure is against the non-DP SLM measured in
the same run on the same records (same seed, same draw).

Per task and seed: an IID draw of n private records (the silo trains on them: the audit's members),
n_val validation records (selection and calibration, as the daemon's held-out split), n
non-members (never trained on) and n_test test records. Each arm trains the first SLM exactly as
the daemon does (crosslm_shared.slm.train_selected, the budget of a silo that plans `--rounds`
rounds: the first SLM gets its share ε / (1 + rounds)); `--rounds 0` spends all of ε on it.

    .venv/bin/python benchmarks/privacy.py --tasks rotten_tomatoes sms_spam --seeds 0 1 2 --out runs/privacy.json
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from _common import base_parser, emit_json, load_avg, machine, print_table, ratio, setup_torch


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "sms_spam"], help="built-in task names")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (draw and training)")
    p.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0], help="ε budgets of the DP arms")
    p.add_argument("--arch", default="minilm", help="SLM architecture: minilm or mpnet4 (default: minilm)")
    p.add_argument("--n", type=int, default=None, help="private records per silo (default: 256; quick: 48)")
    p.add_argument("--n-val", type=int, default=64, help="validation records (default: 64)")
    p.add_argument("--n-test", type=int, default=None, help="test records (default: 500; quick: 64)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: 3; quick: 1)")
    p.add_argument("--dp-epochs", type=int, default=None, help="epochs with DP (default: as --epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="expected batch size (default: 32)")
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate without DP (default: 2e-4)")
    p.add_argument("--dp-lr", type=float, default=5e-4, help="learning rate with DP (default: 5e-4)")
    p.add_argument("--rounds", type=int, default=0,
                   help="rounds the silo's budget must also cover (default: 0, the first SLM takes all of ε)")
    p.add_argument("--train-layers", type=int, default=1,
                   help="encoder layers trained under DP, from the top; -1 = all (default: 1)")
    p.add_argument("--timing-reps", type=int, default=0,
                   help="instead of the accuracy runs: time one epoch of training on the first task's records "
                        "without DP, with DP on the top --train-layers and with DP on all layers, interleaved "
                        "this many times (the machine's load falls on every mode alike)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    args = p.parse_args(argv)
    quick = args.quick
    args.n = args.n or (48 if quick else 256)
    args.n_test = args.n_test or (64 if quick else 500)
    args.epochs = args.epochs or (1 if quick else 3)
    args.dp_epochs = args.dp_epochs or args.epochs
    if quick:
        args.tasks, args.seeds, args.epsilons = args.tasks[:1], args.seeds[:1], args.epsilons[-1:]
    return args


def draw(task_name: str, seed: int, args):
    """IID members, validation, non-members and test records from the task's offline dataset."""
    from crosslm_shared.data import load_examples
    from crosslm_shared.tasks import load_task

    task = load_task(task_name)
    ex = load_examples(task)
    idx = np.random.default_rng(seed).permutation(len(ex))
    cuts = np.cumsum([args.n, args.n_val, args.n, args.n_test])
    parts = np.split(idx[:cuts[-1]], cuts[:-1])
    pairs = [([ex.texts[i] for i in p], [ex.labels[i] for i in p]) for p in parts]
    return task, pairs


def one_arm(task, pairs, seed: int, epsilon: float | None, args) -> dict:
    from crosslm_shared.audit import loss_attack
    from crosslm_shared.dp import PrivacyBudget
    from crosslm_shared.privacy import AuditConfig, PrivacyConfig
    from crosslm_shared.slm import balanced_accuracy, train_selected
    from crosslm_shared.slm_config import SLMTrainConfig

    members, val, nonmembers, test = pairs
    cfg = SLMTrainConfig(lrs=(args.lr if epsilon is None else args.dp_lr,),
                         max_epochs=args.epochs if epsilon is None else args.dp_epochs,
                         batch_size=args.batch_size, seed=seed)
    budget = None
    if epsilon is not None:
        budget = PrivacyBudget(PrivacyConfig(enabled=True, epsilon=epsilon, train_layers=args.train_layers), n_records=len(members[0]),
                               planned=1 + args.rounds)
    t0 = time.perf_counter()
    slm, info = train_selected(args.arch, task.label_names, members, val, cfg, desc=f"eps={epsilon}", privacy=budget)
    seconds = time.perf_counter() - t0
    pred = slm.logits(test[0]).argmax(-1).numpy()
    audit = loss_attack(slm, members, nonmembers, AuditConfig(bootstrap=500, seed=seed))
    return {"task": task.name, "seed": seed, "epsilon": epsilon, "train_seconds": round(seconds, 1),
            "test_accuracy": float((pred == np.asarray(test[1])).mean()),
            "test_balanced_accuracy": balanced_accuracy(pred, test[1]), "val_acc": info["val_acc"],
            "epoch": info["epochs"], "lr": info["lr"], "privacy": info.get("privacy"),
            "sigma": budget.entries[0]["noise_multiplier"] if budget else None,
            "audit": {k: audit[k] for k in ("auc", "auc_se", "auc_ci95", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_se",
                                            "n_members", "n_nonmembers")}}


def timing(args) -> dict:
    """Seconds per epoch of `fit` on the same records and model: no DP, DP (top layers), DP (all)."""
    from crosslm_shared.dp import PrivacyBudget
    from crosslm_shared.privacy import PrivacyConfig
    from crosslm_shared.slm import fit, new_slm
    from crosslm_shared.slm_config import SLMTrainConfig

    task, (members, *_rest) = draw(args.tasks[0], args.seeds[0], args)
    cfg = SLMTrainConfig(lrs=(args.lr,), max_epochs=1, batch_size=args.batch_size, seed=args.seeds[0])
    base = new_slm(args.arch, task.label_names)
    modes = {"no DP": None, f"DP top {args.train_layers}": args.train_layers, "DP all": -1}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.timing_reps):
        for mode, layers in modes.items():
            plan = None
            if layers is not None:
                budget = PrivacyBudget(PrivacyConfig(enabled=True, epsilon=8.0, train_layers=layers),
                                       n_records=len(members[0]), planned=1)
                plan = budget.plan(n=len(members[0]), batch_size=args.batch_size, epochs=1, runs=1, what=mode)
            slm = base.clone()
            t0 = time.perf_counter()
            fit(slm, *members, lr=args.lr, epochs=1, cfg=cfg, dp=plan)
            seconds[mode].append(time.perf_counter() - t0)
    med = {m: float(np.median(v)) for m, v in seconds.items()}
    rows = [[m, med[m], ratio(med[m], med["no DP"])] for m in modes]
    print_table(["mode", "s / epoch (median)", "× no DP"], rows,
                title=f"{args.arch}, {len(members[0])} records, batch {args.batch_size}, {args.timing_reps} reps")
    return {"seconds": seconds, "median_s": med, "ratio_vs_no_dp": {m: ratio(med[m], med["no DP"]) for m in modes}}


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_torch(args.threads)
    started = load_avg()
    if args.timing_reps:
        emit_json({"benchmark": "privacy-timing", "machine": machine(started_load=started), "arch": args.arch,
                   "n": args.n, "batch_size": args.batch_size, **timing(args)}, args.out)
        return
    rows, runs = [], []
    for seed in args.seeds:
        for task_name in args.tasks:
            task, pairs = draw(task_name, seed, args)
            base = None
            for epsilon in [None, *args.epsilons]:
                r = one_arm(task, pairs, seed, epsilon, args)
                base = base or r
                r["time_ratio_vs_no_dp"] = ratio(r["train_seconds"], base["train_seconds"])
                runs.append(r)
                a = r["audit"]
                rows.append([task_name, seed, "none" if epsilon is None else f"{epsilon:g}", r["test_accuracy"],
                             r["test_balanced_accuracy"], a["auc"], a["auc_se"], a["tpr_at_1pct_fpr"],
                             r["train_seconds"], r["time_ratio_vs_no_dp"]])
                print(f"[privacy] {task_name} seed {seed} eps {epsilon}: acc {r['test_accuracy']:.3f} "
                      f"AUC {a['auc']:.3f}±{a['auc_se']:.3f} {r['train_seconds']}s", flush=True)
                if args.out:  # partial results survive an interrupted run
                    emit_json({"partial": True, "runs": runs}, Path(str(args.out) + ".partial"))
    print_table(["task", "seed", "ε", "test acc", "bal acc", "MIA AUC", "± se", "TPR@1%", "train s", "× no-DP"], rows)
    emit_json({"benchmark": "privacy", "machine": machine(started_load=started), "arch": args.arch,
               "settings": {k: getattr(args, k) for k in ("n", "n_val", "n_test", "epochs", "dp_epochs", "batch_size", "lr",
                                                          "dp_lr", "rounds", "train_layers", "threads")},
               "runs": runs}, args.out)


if __name__ == "__main__":
    main()
