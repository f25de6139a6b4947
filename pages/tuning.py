"""Tuning: start a `ragtune tune` run in a subprocess (one folder per run), watch its loss, progress and
readable log live; stop, resume, or keep a stopped run's checkpoint as an adapter; the feedback loop (corrections
-> dataset -> candidate -> gate -> promote / roll back); manage adapters."""

import time

import streamlit as st

from core.config import parse_overrides
from serving import tune_jobs, webapp

home = str(webapp.app_home())
if webapp.password_required(home) and not st.session_state.get("authenticated"):
    st.stop()  # the entry script asks for the password; this guards a page run on its own
store = webapp.chat_store(home)
jobs = tune_jobs.job_registry()
state = st.session_state
ERRORS = webapp.USER_ERRORS

st.title("Tuning")
with st.form("tune"):
    st.caption("Starts `ragtune tune` in the background; the app (and the chat) stays usable while it runs. "
               "The demo settings take about 6 s a step on 2 CPU cores: ~6 minutes for 60 steps.")
    name = st.text_input("Adapter name", value=webapp.DEMO_ADAPTER)
    data = st.text_input("Training data (JSONL/JSON/CSV/Parquet; comma-separate several)", value=webapp.DEMO_TUNE["data"][0],
                         key="tune_data", help="Only files under the allowed roots (data_roots in app.yaml)")
    st.caption("Training data may come from: " + ", ".join(str(r) for r in webapp.data_roots(home)))
    c1, c2, c3 = st.columns(3)
    max_steps = c1.number_input("max_steps", min_value=1, value=webapp.DEMO_TUNE["max_steps"])
    learning_rate = c2.number_input("learning_rate", value=2e-4, format="%.1e")
    method = c3.selectbox("method", ["lora", "dora", "full"])
    extra = st.text_area("More config (key=value per line, see `ragtune tune --show-config`)",
                         value="eval_steps=20\nsave_steps=20\nlogging_steps=2\nforgetting_probe=false")
    start = st.form_submit_button("Start training")
if start:
    try:
        values = {**{k: v for k, v in webapp.DEMO_TUNE.items() if k not in ("name", "data", "max_steps")},
                  "name": name.strip(), "data": [d.strip() for d in data.split(",") if d.strip()], "max_steps": int(max_steps),
                  "learning_rate": float(learning_rate), "method": method,
                  **parse_overrides([line for line in extra.splitlines() if line.strip()]), "overwrite": True}
        job = jobs.start(home, values, store)
        state.follow_run = job.run_id  # the panel follows the run just started
        st.success(f"started run {job.run_id} ({name}) in {job.run_dir}")
    except ERRORS as exc:
        st.error(str(exc))


@st.fragment(run_every=3)
def runs_panel() -> None:
    jobs.refresh(store)
    runs = store.runs(20)
    if not runs:
        st.caption("No runs started from the app yet.")
        return
    st.subheader("Runs")
    st.dataframe([{k: r[k] for k in ("id", "name", "status", "returncode")} | {"folder": str(tune_jobs.run_dir_of(r))}
                  for r in runs], hide_index=True)
    by_id = {r["id"]: r for r in runs}
    if state.get("follow_run") in by_id:
        state.run_pick = state.pop("follow_run")
    if state.get("run_pick") not in by_id:
        state.run_pick = runs[0]["id"]
    run_id = st.selectbox("Run", list(by_id), key="run_pick",
                          format_func=lambda i: f"{i}: {by_id[i]['name']} ({by_id[i]['status']})")
    run = by_id[run_id]
    view = tune_jobs.run_view(run)
    progress = view["progress"]
    if progress:
        eta = f" · ETA {webapp.format_duration(progress['eta_s'])}" if run["status"] == "running" else ""
        speed = f" · {progress['step_s']:.1f} s/step" if progress.get("step_s") else ""
        st.progress(min(1.0, progress["step"] / progress["max_steps"]),
                    text=f"step {progress['step']}/{progress['max_steps']}{speed}{eta}")
    curve = view["curve"]
    if curve["loss"] or curve["eval_loss"]:
        steps = sorted(set(curve["loss"]) | set(curve["eval_loss"]))
        st.line_chart({"step": steps, "loss": [curve["loss"].get(s) for s in steps],
                       "eval_loss": [curve["eval_loss"].get(s) for s in steps]}, x="step", y=["loss", "eval_loss"])
    else:
        st.caption("no loss logged yet (the model loads first)")
    st.code(view["log_text"] or "(nothing logged yet)", language=None)
    with st.expander("Raw output of the process"):
        st.code(view["output"] or "(no output yet)", language=None)
    if run["status"] == "running":
        if st.button("Stop run", key=f"stop_{run['id']}"):
            jobs.stop(run["id"], store)
            st.rerun(scope="fragment")
    elif run["status"] in ("stopped", "failed") and view["checkpoints"]:
        st.caption(f"Checkpoints: {', '.join(view['checkpoints'])}")
        c1, c2 = st.columns(2)
        if c1.button("Resume from the newest checkpoint", key=f"resume_{run['id']}"):
            try:
                job = jobs.resume(home, run, store)
                state.follow_run = job.run_id
                st.rerun(scope="fragment")
            except ERRORS as exc:
                st.error(str(exc))
        keep_name = c2.text_input("Keep as adapter named", value=f"{run['name']}-step{view['checkpoints'][-1].split('-')[-1]}",
                                  key=f"keep_name_{run['id']}")
        if c2.button("Keep this checkpoint as an adapter", key=f"keep_{run['id']}"):
            try:
                path = tune_jobs.keep_checkpoint(home, run, keep_name.strip())
                st.success(f"kept {view['checkpoints'][-1]} as adapter {keep_name} ({path})")
            except ERRORS as exc:
                st.error(str(exc))


runs_panel()

st.subheader("From feedback")
collections = webapp.collections(home)
if not collections:
    st.caption("No collection yet: corrections and votes are kept per collection.")
else:
    fb_collection = st.selectbox("Collection", collections, key="fb_collection")
    waiting = webapp.feedback_pending(home, fb_collection)
    current = webapp.promoted_adapter(home, fb_collection)
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Corrections", waiting["corrections"])
    c2.metric("Thumbs up", waiting["thumbs_up"])
    c3.metric("Arena votes with a winner", waiting["arena_votes"])
    c4.metric("Current adapter", current or "none")
    st.caption("1. build the dataset · 2. train a candidate (background run, above) · 3. run the gate: a paired A/B "
               "on held-out questions, candidate vs current in rag+ft · 4. promote (or roll back) with the evidence.")
    b1, b2 = st.columns(2)
    keep_thumbs = b1.checkbox("Keep thumbs-up answers as positive rows", key="fb_thumbs")
    if b1.button("Build the dataset", key="fb_build"):
        try:
            state.fb_export = webapp.export_feedback(home, fb_collection, keep_thumbs)
        except ERRORS as exc:
            st.error(str(exc))
    if state.get("fb_export"):
        r = state.fb_export
        b1.success(f"{r['rows']} rows ({r['abstention_rows']} abstention, {r['thumbs_up_rows']} thumbs-up) and "
                   f"{r['pairs']} preference pairs; sha256 {r['sha256'][:12]}")
        for f in r["flagged_changed"]:
            b1.warning(f"{f['feedback']} left out: document(s) changed since: {', '.join(f['documents'])}")
    candidate_name = b2.text_input("Candidate adapter name", value=f"{fb_collection}-fb", key="fb_name")
    fb_steps = b2.number_input("max_steps", min_value=1, value=30, key="fb_steps")
    if b2.button("Train the candidate", key="fb_train", disabled=not state.get("fb_export", {}).get("rows")):
        try:
            job = jobs.start(home, webapp.feedback_tune_values(home, fb_collection, candidate_name.strip(), fb_steps), store)
            state.follow_run = job.run_id
            b2.success(f"started run {job.run_id} ({candidate_name}); follow it under Runs")
        except ERRORS as exc:
            b2.error(str(exc))
    names = [a["name"] for a in tune_jobs.list_adapters(home) if not a.get("error") and a["name"] != current]
    g1, g2 = st.columns(2)
    gate_candidate = g1.selectbox("Candidate", names, key="fb_candidate", placeholder="no adapter yet")
    gate_questions = g2.text_input("Held-out questions", value=webapp.default_gate_questions(home, fb_collection),
                                   key="fb_questions", help="never the rows the candidate was trained on")
    gate_limit = g1.number_input("Only the first N questions (0 = all)", min_value=0, value=0, key="fb_limit")
    if g2.button("Run the gate", key="fb_gate", disabled=not gate_candidate):
        bar = st.progress(0.0, text="gate: starting")
        started = time.time()

        def gate_progress(done: int, total: int, message: str) -> None:
            bar.progress(done / max(total, 1), text=f"gate: {webapp.eta_text(done, max(total, 1), started)} · {message}")
        try:
            state.fb_decision = webapp.run_gate(home, gate_candidate, fb_collection, gate_questions.strip(), int(gate_limit),
                                                progress=gate_progress)
        except ERRORS as exc:
            st.error(str(exc))
        # the bar stays, full, with the time the gate took (as on the A/B and Collections pages)
    decision = state.get("fb_decision")
    if decision and decision["collection"] == fb_collection:
        (st.success if decision["promote"] else st.warning)(decision["summary"].splitlines()[0])
        st.code(decision["summary"], language=None)
        label = "Promote" if decision["promote"] else "Promote anyway (recorded as forced)"
        if st.button(label, key="fb_promote", disabled=decision["candidate"] == current):
            pid = webapp.promote(home, fb_collection, decision)
            st.success(f"{decision['candidate']} is now the default adapter of {fb_collection} (promotion {pid})")
            st.rerun()
    history = webapp.promotion_history(home, fb_collection)
    if history:
        st.dataframe([{"when": time.strftime("%Y-%m-%d %H:%M", time.localtime(h["created_at"])), "action": h["action"],
                       "adapter": h["adapter"] or "none", "forced": h["forced"], "by": h["actor"],
                       "correct diff [CI]": (f"{h['evidence']['correct']['mean']:+.3f} [{h['evidence']['correct']['ci_low']:+.3f}, "
                                             f"{h['evidence']['correct']['ci_high']:+.3f}]" if h["evidence"].get("correct") else ""),
                       "current after": h["current_after"] or "none"} for h in history], hide_index=True)
    if current and st.button(f"Roll back {current}", key="fb_rollback"):
        restored = webapp.rollback(home, fb_collection)
        st.success(f"rolled back: the default adapter of {fb_collection} is now {restored or 'none'}")
        st.rerun()

st.subheader("Adapters")
adapters = tune_jobs.list_adapters(home)
if not adapters:
    st.caption("No adapters yet.")
for a in adapters:
    with st.expander(f"{a['name']} · {a.get('method') or '?'} on {a.get('base_model') or '?'} · {a.get('size_mb', 0)} MB"):
        if a.get("error"):
            st.warning(a["error"])
        st.json({"task": a.get("task"), "created": a.get("created"), "metrics": a.get("metrics"),
                 "forgetting (perplexity change %)": a.get("forgetting")}, expanded=False)
        if st.button("Delete adapter", key=f"rm_{a['name']}"):
            tune_jobs.remove_adapter(home, a["name"])
            st.rerun()
