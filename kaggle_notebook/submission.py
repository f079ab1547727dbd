# %% [markdown]
# # LLM Prompt Recovery: offline submission with prompt-recovery
#
# Attach the `prompt-recovery-bundle` dataset (built by `prompt-recovery bundle`), the competition data and,
# optionally, a model. Internet off. The second cell writes a complete fallback submission before anything
# can fail; every later cell only improves it, and a failure in any of them (install, contract, imports, model
# load, predict) is caught, written to `report.json` and named in the last line: a crashed notebook scores
# nothing, a fallback submission scores. Generated from `kaggle_notebook/submission.py`
# (`python -m prompt_recovery.notebook`): edit the `.py`, not the `.ipynb`.

# %%
# Every path and the budget. PROMPT_RECOVERY_KAGGLE_ROOT points these at a folder laid out like /kaggle.
import glob
import os
import time

NOTEBOOK_START = time.time()
KAGGLE = os.environ.get("PROMPT_RECOVERY_KAGGLE_ROOT", "/kaggle")
BUNDLE = os.path.join(KAGGLE, "input", "prompt-recovery-bundle")
TEST_CSV = os.path.join(KAGGLE, "input", "llm-prompt-recovery", "test.csv")
OUTPUT = os.path.join(KAGGLE, "working", "submission.csv")
REPORT = os.path.join(KAGGLE, "working", "report.json")
# A model under /kaggle/input (an HF folder or a .gguf file); None: the bundle's model/ if it has one,
# else the embedded Gemma 3 270M shipped in the bundle's wheels.
MODEL = None
# An adapter folder; None: the first one in the bundle, else the LoRA shipped for the default model.
ADAPTER = None
# A run spec (TOML or JSON) listing ensemble members; None: the bundle's members.json if it has one, else the
# single ADAPTER. COMBINE: how a row's candidates become one prompt (first, concat or mbr); the spec may set it.
MEMBERS = None
COMBINE = "first"
QUANTIZE = "none"  # "4bit" for 7B+ models on a T4
EMBEDDER = None  # e.g. /kaggle/input/sentence-t5-base: trims predictions to the 128 tokens the scorer reads
TIME_LIMIT = 8.5 * 3600  # seconds for the whole notebook (Kaggle allows 9 h)
BUDGET_PER_ROW = 25.0  # seconds a row at most
# The image must hold what the bundle takes from it (manifest.json's from_image); False: go on when it does not.
STOP_ON_CONTRACT = True
SITE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "prompt_recovery_site")

if MODEL is None and os.path.isfile(os.path.join(BUNDLE, "model", "config.json")):
    MODEL = os.path.join(BUNDLE, "model")
if MEMBERS is None and os.path.isfile(os.path.join(BUNDLE, "members.json")):
    MEMBERS = os.path.join(BUNDLE, "members.json")
if ADAPTER is None and os.path.isdir(os.path.join(BUNDLE, "adapters")):
    found = sorted(os.listdir(os.path.join(BUNDLE, "adapters")))
    ADAPTER = os.path.join(BUNDLE, "adapters", found[0]) if found else None
print(f"bundle {BUNDLE}\nmodel {MODEL or 'embedded default'}\nadapter {ADAPTER or 'shipped default'}")
print(f"members {MEMBERS or 'one: the adapter above'}, combine {COMBINE}")
print(f"test {TEST_CSV}\noutput {OUTPUT}\nbudget {TIME_LIMIT:.0f}s, {BUDGET_PER_ROW}s a row")

# %%
# Standard library only: a complete all-fallback submission exists before installs, imports or model loads.
import csv
import json

FAILURE = None  # the first failure after the fallback file is written: {"stage", "error_type", "error_message"}


def fail(stage, exc):
    global FAILURE
    print(f"{stage} failed: {type(exc).__name__}: {exc}")
    if FAILURE is None:
        FAILURE = {"stage": stage, "error_type": type(exc).__name__, "error_message": str(exc).strip()}


FALLBACK = "Please improve this text using the writing style with maintaining the original meaning but altering the tone."
try:
    with open(os.path.join(BUNDLE, "mean_prompt.txt"), encoding="utf-8") as f:
        FALLBACK = " ".join(f.read().split()) or FALLBACK
except OSError as exc:
    print(f"no bundled mean prompt ({exc}); using the built-in one")


def is_blank_line(fields):
    # The package's rule (prompt_recovery.data): a white-space line is no row; a line of only commas is one.
    return not fields or (len(fields) == 1 and not fields[0].strip())


def read_test_ids(path):
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            with open(path, newline="", encoding=encoding) as f:
                lines = [row for row in csv.reader(f)]
        except UnicodeDecodeError:
            continue
        kept = [row for row in lines if not is_blank_line(row)]
        if len(kept) < len(lines):
            print(f"warning: {len(lines) - len(kept)} blank line(s) of {path} skipped; they are no rows")
        header = [h.strip() for h in kept[0]]
        col = header.index("id")
        return [(row + [""] * len(header))[col] for row in kept[1:]]
    raise ValueError(f"cannot decode {path}")


def write_fallback(path, ids, prompt):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "rewrite_prompt"])
        writer.writerows([i, prompt] for i in ids)
    os.replace(tmp, path)


os.makedirs(os.path.dirname(OUTPUT), exist_ok=True)
TEST_IDS = read_test_ids(TEST_CSV)
write_fallback(OUTPUT, TEST_IDS, FALLBACK)
# An earlier run's reports would pass for this run's in the last cell.
for stale in [REPORT, *glob.glob(OUTPUT + ".shards/shard*_report.json")]:
    if os.path.isfile(stale):
        os.remove(stale)
print(f"fallback submission written: {len(TEST_IDS)} rows")

# %%
# Install from the bundle only: no index, no resolver, the image's torch and CUDA untouched.
import subprocess
import sys


class InstallError(Exception):
    pass


try:
    wheels = sorted(glob.glob(os.path.join(BUNDLE, "wheels", "*.whl")))
    if not wheels:
        raise FileNotFoundError(f"no wheels in {os.path.join(BUNDLE, 'wheels')}")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--quiet",
         "--target", SITE, *wheels],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise InstallError(f"pip exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    sys.path.insert(0, SITE)
    print(f"installed {len(wheels)} wheels into {SITE}")
except Exception as exc:
    fail("install", exc)

# %%
# The bundle's contract with the image, checked before any time goes to imports or a model: every package its
# wheels require and do not ship (manifest.json's from_image), each in the range those wheels ask for. The
# check is the package's standard-library-only module, so it runs on an image that lacks them.
if FAILURE is None:
    try:
        from prompt_recovery.contract import ContractError, check_file

        problems = check_file(os.path.join(BUNDLE, "manifest.json"))
        for line in problems:
            print(f"contract: {line}")
        if problems and STOP_ON_CONTRACT:
            raise ContractError("; ".join(problems))
        print(f"contract: {len(problems)} problem(s)" + ("; going on (STOP_ON_CONTRACT is False)" if problems else ""))
    except Exception as exc:
        fail("contract", exc)

# %%
# Imports: what the prediction needs, loaded here so that a missing module is named as one.
if FAILURE is None:
    try:
        import torch  # noqa: F401

        import prompt_recovery
        from prompt_recovery import engine, ensemble, model, predict  # noqa: F401  (imported late by the run)
        from prompt_recovery.config import BudgetArgs, EnsembleArgs, ModelArgs, OutputArgs, PredictArgs
        from prompt_recovery.multigpu import predict_on_gpus

        print(f"prompt_recovery {prompt_recovery.__version__} from {os.path.dirname(prompt_recovery.__file__)}")
    except Exception as exc:
        fail("imports", exc)

# %%
# Predict with the same typed function the CLI calls; on two GPUs, replicas or one spread model.
import traceback

MODE, REPORT_OBJ = None, None
if FAILURE is None:
    try:
        suffix = os.path.join(BUNDLE, "suffix.txt")
        args = PredictArgs(
            test_csv=TEST_CSV,
            output=OUTPUT,
            report=REPORT,
            progress=False,
            model=ModelArgs(model=MODEL, adapter=ADAPTER or "auto", quantize=QUANTIZE),
            budget=BudgetArgs(budget_per_row=BUDGET_PER_ROW,
                              time_limit=max(60.0, TIME_LIMIT - (time.time() - NOTEBOOK_START))),
            out=OutputArgs(fallback_prompt=FALLBACK, suffix_file=suffix if os.path.isfile(suffix) else "auto",
                           embedder=EMBEDDER),
            ensemble=EnsembleArgs(members=MEMBERS, combine=COMBINE),
        )
        MODE, REPORT_OBJ = predict_on_gpus(args, FALLBACK)
        print(f"mode: {MODE}")
        print(REPORT_OBJ.summary() if hasattr(REPORT_OBJ, "summary") else REPORT_OBJ)
    except Exception as exc:
        traceback.print_exc()
        fail("predict", exc)  # the report predict wrote, if it got that far, names the stage it reached


# %%
# The file Kaggle will read: every test id, in order, each with a non-empty prompt; else the fallback again.
# Then report.json and the last line: rows generated and, when fewer than all, why.
def check_submission(path, ids):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "rewrite_prompt"], rows[0]
    assert [r[0] for r in rows[1:]] == ids, "ids differ from the test file"
    assert all(len(r) == 2 and r[1].strip() for r in rows[1:]), "a blank prompt"
    return len(rows) - 1


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


VALID = True
try:
    print(f"submission OK: {check_submission(OUTPUT, TEST_IDS)} rows")
except Exception as exc:
    VALID = False
    print(f"submission invalid ({exc}); writing the fallback submission")
    write_fallback(OUTPUT, TEST_IDS, FALLBACK)
    print(f"submission OK: {check_submission(OUTPUT, TEST_IDS)} rows")
    fail("submission", exc)

try:
    # predict's own report (one process), or its replicas' (one per GPU), written in this run or not at all.
    parts = [read_json(REPORT)] if MODE != "replicas" else [
        read_json(p) for p in sorted(glob.glob(OUTPUT + ".shards/shard*_report.json"))]
    parts = [p for p in parts if p]
    FINAL = dict(parts[0]) if len(parts) == 1 else {"replicas": parts} if parts else {}
    FALLEN = sum(p.get("fallback", p.get("rows", 0)) for p in parts)
    GENERATED = max(0, sum(p.get("rows", 0) for p in parts) - FALLEN) if VALID else 0
    reasons = {}
    for p in parts:
        for k, v in (p.get("fallback_reasons") or {}).items():
            reasons[k] = reasons.get(k, 0) + v
        if FAILURE is None and p.get("error"):
            FAILURE = {"stage": p.get("stage") or "predict", "error_type": p.get("error_type"),
                       "error_message": p.get("error_message") or p["error"]}
        elif FAILURE is not None and FAILURE["stage"] == "predict" and p.get("stage"):
            FAILURE["stage"] = p["stage"]  # predict raised after writing its report: the stage it reached
    FINAL.update({"rows": len(TEST_IDS), "rows_generated": GENERATED, "stage": None, "error_type": None,
                  "error_message": None, "error": None, **(FAILURE or {})})
    if FAILURE:
        FINAL["error"] = f"{FAILURE['error_type']}: {FAILURE['error_message']}"
    why = ""
    if FAILURE:
        why = f": {FAILURE['stage']}: " + " ".join(FAILURE["error_message"].split())
    elif len(TEST_IDS) > GENERATED:
        why = ": fallback for " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    FINAL["last_line"] = f"{GENERATED} of {len(TEST_IDS)} rows generated{why}"
    with open(REPORT + ".tmp", "w", encoding="utf-8") as f:
        json.dump(FINAL, f, indent=2)
    os.replace(REPORT + ".tmp", REPORT)
    print(FINAL["last_line"])
except Exception as exc:  # the report is for people; the submission above is what scores
    print(f"report not written ({type(exc).__name__}: {exc}); the submission stands")
