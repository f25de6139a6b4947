"""A/B testing: offline runs over a question set (report with CIs and plots), and a blind arena."""

import random
from pathlib import Path

import streamlit as st

from serving import webapp
from serving.ab import arena, report as ab_report
from serving.ab.runner import ARMS, ABConfig, run_ab
from serving.ab.runs import ABStore
from serving.config import ServingError

home = str(webapp.app_home())
ws = webapp.workspace(home)
store = ABStore(ws.db_path)
state = st.session_state

st.title("A/B testing")
with st.spinner("Loading the model (once for all users)..."):
    assistant = webapp.assistant(home, webapp.serve_config_json())
collections = ws.names()
adapters = [a["name"] for a in assistant.generator.available_adapters() if a.get("usable")]
question_files = sorted(str(p.relative_to(webapp.REPO)) for p in (webapp.REPO / "corpora").glob("*/qa/*.jsonl"))

offline, arena_tab = st.tabs(["Offline evaluation", "Arena (blind votes)"])

with offline:
    with st.form("ab-run"):
        qfile = st.selectbox("Questions", question_files, index=question_files.index("corpora/corvida/qa/test.jsonl")
                             if "corpora/corvida/qa/test.jsonl" in question_files else 0)
        c1, c2 = st.columns(2)
        collection = c1.selectbox("Collection (rag arms)", collections, index=0 if collections else None, placeholder="none yet")
        adapter = c2.selectbox("Adapter (ft arms)", adapters, index=0 if adapters else None, placeholder="none yet")
        arms = st.multiselect("Arms", ARMS, default=[a for a in ARMS if (a in ("base", "rag") or adapter)
                                                     and (a in ("base", "ft") or collection)])
        limit = st.number_input("Questions (0 = all)", min_value=0, value=10, step=5)
        submitted = st.form_submit_button("Run", type="primary")
    if submitted:
        try:
            config = ABConfig(questions=str(webapp.REPO / qfile), collection=collection, adapter=adapter,
                              arms=list(arms), limit=int(limit))
            bar = st.progress(0.0, text="starting")
            summary = run_ab(assistant, config, lambda done, total, msg: bar.progress(done / total, text=f"{done}/{total} {msg}"))
            st.success(f"{summary['run']}: {summary['computed']} answers computed, {summary['reused']} reused from the cache "
                       f"in {summary['seconds']:.0f} s")
            state.ab_run = summary["run"]
        except (ValueError, ServingError) as exc:
            st.error(str(exc))

    runs = [r["name"] for r in store.runs()]
    if runs:
        chosen = st.selectbox("Report for run", runs, index=runs.index(state.ab_run) if state.get("ab_run") in runs else 0)
        out = Path(home) / "reports" / chosen
        rep = ab_report.build_report(store, chosen, n_boot=1000)
        files = ab_report.write_report(store, chosen, out, report=rep)
        st.caption(f"{rep['questions']} questions answered by every arm; means (%) with 95% paired-bootstrap CIs")
        table = {arm: {m: f"{v['mean'] * 100:.1f} [{v['ci_low'] * 100:.1f}, {v['ci_high'] * 100:.1f}]"
                       for m, v in cells.items() if m != "latency_s"} for arm, cells in rep["arms"].items()}
        st.dataframe(table)
        cols = st.columns(2)
        cols[0].image(files["means"])
        if "hit_at_k" in files:
            cols[1].image(files["hit_at_k"])
        diffs = [d for d in rep["differences"] if d["metric"] == "correct"]
        if diffs:
            st.subheader("Paired differences (correct)")
            st.dataframe([{"comparison": f"{d['a']} − {d['b']}", "difference (pts)": round(d["mean"] * 100, 1),
                           "95% CI": f"[{d['ci_low'] * 100:+.1f}, {d['ci_high'] * 100:+.1f}]", "test": d["test"],
                           "p": round(d["p_value"], 4)} for d in diffs])
        if rep.get("interaction"):
            i = rep["interaction"]["correct"]
            st.markdown(f"**Interaction** (does fine-tuning help more with retrieval?): {i['mean'] * 100:+.1f} pts, "
                        f"95% CI [{i['ci_low'] * 100:+.1f}, {i['ci_high'] * 100:+.1f}]")
        if len(runs) > 1:
            st.subheader("Compare two runs")
            a, b = st.columns(2)
            run_a = a.selectbox("Run A", runs, key="cmp_a")
            run_b = b.selectbox("Run B", runs, index=1, key="cmp_b")
            ra, rb = ab_report.build_report(store, run_a, n_boot=500), ab_report.build_report(store, run_b, n_boot=500)
            st.dataframe({f"{arm} (correct %)": {run_a: round(ra["arms"].get(arm, {}).get("correct", {}).get("mean", float("nan")) * 100, 1),
                                                 run_b: round(rb["arms"].get(arm, {}).get("correct", {}).get("mean", float("nan")) * 100, 1)}
                          for arm in ARMS})

with arena_tab:
    st.caption("Two arms, drawn at random, answer without labels. Vote, and only then see which was which.")
    c1, c2 = st.columns(2)
    a_collection = c1.selectbox("Collection", collections, index=0 if collections else None, key="arena_collection",
                                placeholder="none yet")
    a_adapter = c2.selectbox("Adapter", adapters, index=0 if adapters else None, key="arena_adapter", placeholder="none yet")
    with st.form("arena-ask", clear_on_submit=True):
        question = st.text_input("Question", placeholder=webapp.DEMO_QUESTION, key="arena_question")
        asked = st.form_submit_button("Ask both")
    if asked:
        try:
            state.arena_round = arena.new_round(question or webapp.DEMO_QUESTION, a_collection, a_adapter,
                                                random.SystemRandom())
        except ServingError as exc:
            st.error(str(exc))
    current = state.get("arena_round")
    if current is not None:
        st.markdown(f"**{webapp.escape_markdown(current.question)}**")
        left, right = st.columns(2)
        for side, col in (("a", left), ("b", right)):
            with col:
                st.markdown(f"#### {side.upper()}")
                if side in current.answers:
                    st.markdown(webapp.escape_markdown(current.answers[side]))
                else:
                    try:
                        pieces = arena.stream_side(assistant, current, side)
                        current.answers[side] = st.write_stream(webapp.escape_markdown(p) for p in pieces)
                        current.answers[side] = pieces.answer.text
                    except ServingError as exc:
                        st.error(str(exc))
        if current.voted is None and set(current.answers) == {"a", "b"}:
            buttons = st.columns(4)
            for (outcome, label), button in zip(arena.OUTCOMES.items(), buttons):
                if button.button(label, key=f"vote_{outcome}"):
                    arena.record_vote(store, current, outcome)
                    st.rerun()
        elif current.voted:
            shown = current.revealed()
            st.success(f"You voted **{arena.OUTCOMES[current.voted]}**. A was `{shown['a']}`, B was `{shown['b']}`.")
    board = arena.leaderboard(store, n_boot=200)
    if board["ratings"]:
        st.subheader(f"Leaderboard ({board['votes']} votes, Bradley-Terry)")
        st.dataframe([{"arm": r["arm"], "rating": round(r["rating"]), "95% CI": f"[{r['ci_low']:.0f}, {r['ci_high']:.0f}]",
                       "votes": r["votes"]} for r in board["ratings"]])
        if board["votes_to_separate"]:
            st.caption(f"About {board['votes_to_separate']} more votes would separate the top two.")
        elif board["votes_to_separate"] == 0:
            st.caption("The top two are separated: their 95% intervals do not overlap.")
