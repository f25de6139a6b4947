"""Tuning: start a `ragtune tune` run in a subprocess, watch its loss live, manage adapters."""

import streamlit as st

from core.config import ConfigError
from serving import webapp
from tuning.errors import TuningError

home = str(webapp.app_home())
store = webapp.chat_store(home)
jobs = webapp.job_registry()

st.title("Tuning")
with st.form("tune"):
    st.caption("Starts `ragtune tune` in the background; the app (and the chat) stays usable while it runs.")
    name = st.text_input("Adapter name", value=webapp.DEMO_ADAPTER)
    data = st.text_input("Training data (JSONL/JSON/CSV/Parquet; comma-separate several)", value=webapp.DEMO_TUNE["data"][0])
    c1, c2, c3 = st.columns(3)
    max_steps = c1.number_input("max_steps", min_value=1, value=webapp.DEMO_TUNE["max_steps"])
    learning_rate = c2.number_input("learning_rate", value=2e-4, format="%.1e")
    method = c3.selectbox("method", ["lora", "dora", "full"])
    extra = st.text_area("More config (key=value per line, see `ragtune tune --show-config`)",
                         value="eval_steps=20\nlogging_steps=2\nforgetting_probe=false")
    start = st.form_submit_button("Start training")
if start:
    from core.config import parse_overrides

    try:
        values = {**{k: v for k, v in webapp.DEMO_TUNE.items() if k not in ("name", "data", "max_steps")},
                  "name": name, "data": [d.strip() for d in data.split(",") if d.strip()], "max_steps": int(max_steps),
                  "learning_rate": float(learning_rate), "method": method,
                  **parse_overrides([line for line in extra.splitlines() if line.strip()]), "overwrite": True}
        job = jobs.start(home, values, store)
        st.success(f"started run {job.run_id} ({name}), process {job.process.pid}")
    except (ConfigError, TuningError, ValueError) as exc:
        st.error(str(exc))


@st.fragment(run_every=3)
def runs_panel() -> None:
    jobs.refresh(store)
    runs = store.runs(10)
    if not runs:
        st.caption("No runs started from the app yet.")
        return
    st.subheader("Runs")
    st.dataframe([{k: r[k] for k in ("id", "name", "status", "returncode", "pid")} for r in runs], hide_index=True)
    run = st.selectbox("Run", runs, format_func=lambda r: f"{r['id']}: {r['name']} ({r['status']})", key="run_pick")
    curve = webapp.loss_curve(webapp.run_log(home, run["name"]))
    if curve["loss"] or curve["eval_loss"]:
        steps = sorted(set(curve["loss"]) | set(curve["eval_loss"]))
        st.line_chart({"step": steps, "loss": [curve["loss"].get(s) for s in steps],
                       "eval_loss": [curve["eval_loss"].get(s) for s in steps]}, x="step", y=["loss", "eval_loss"])
    else:
        st.caption("no loss logged yet")
    st.code(webapp.tail(run["output_path"]) or "(no output yet)", language=None)
    if run["status"] == "running" and st.button("Stop run", key=f"stop_{run['id']}"):
        jobs.stop(run["id"], store)


runs_panel()

st.subheader("Adapters")
from tuning.adapters import list_adapters, remove_adapter  # noqa: E402  (kept next to its use)

adapters = list_adapters(webapp.app_home())
if not adapters:
    st.caption("No adapters yet.")
for a in adapters:
    with st.expander(f"{a['name']} · {a.get('method') or '?'} on {a.get('base_model') or '?'} · {a.get('size_mb', 0)} MB"):
        if a.get("error"):
            st.warning(a["error"])
        st.json({"task": a.get("task"), "created": a.get("created"), "metrics": a.get("metrics"),
                 "forgetting (perplexity change %)": a.get("forgetting")}, expanded=False)
        if st.button("Delete adapter", key=f"rm_{a['name']}"):
            remove_adapter(webapp.app_home(), a["name"])
            st.rerun()
