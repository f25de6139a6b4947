"""A/B testing: offline runs over a question set (report with CIs and plots, and the answers themselves),
and a blind arena with a Bradley-Terry leaderboard that claims a separation only when the votes support it."""

import time

import streamlit as st

from serving import webapp
from serving.ab.runner import ARMS

home = str(webapp.app_home())
if webapp.password_required(home) and not st.session_state.get("authenticated"):
    st.stop()  # the entry script asks for the password; this guards a page run on its own
state = st.session_state
ERRORS = webapp.USER_ERRORS

st.title("A/B testing")
assistant = webapp.engine(home).wait()  # streamlit_app.py shows the loading progress first
if assistant is None:
    st.error(f"The model could not be loaded: {webapp.engine(home).error}")
    st.stop()
collections = webapp.collections(home)
adapters = webapp.usable_adapters(assistant)
question_files = webapp.question_files()

offline, arena_tab = st.tabs(["Offline evaluation", "Arena (blind votes)"])

with offline:
    with st.form("ab-run"):
        default_q = "corpora/corvida/qa/test.jsonl"
        qfile = st.selectbox("Questions", question_files, index=question_files.index(default_q)
                             if default_q in question_files else 0)
        c1, c2 = st.columns(2)
        collection = c1.selectbox("Collection (rag arms)", collections, index=0 if collections else None, placeholder="none yet")
        adapter = c2.selectbox("Adapter (ft arms)", adapters, index=0 if adapters else None, placeholder="none yet")
        arms = st.multiselect("Arms", ARMS, default=[a for a in ARMS if (a in ("base", "rag") or adapter)
                                                     and (a in ("base", "ft") or collection)])
        c3, c4 = st.columns(2)
        limit = c3.number_input("Questions (0 = all)", min_value=0, value=10, step=5)
        run_name = c4.text_input("Run name", key="ab_run_name", placeholder="empty: questions-collection-adapter-date",
                                 help="letters, digits, '.', '_' or '-'; a run of the same name reuses cached answers")
        submitted = st.form_submit_button("Run", type="primary")
    if submitted:
        try:
            name = run_name.strip() or webapp.default_run_name(qfile, collection, adapter)
            bar = st.progress(0.0, text="starting: the first answers also warm up the model")
            started = time.time()
            summary = webapp.run_ab(home, assistant, str(webapp.REPO / qfile), collection, adapter, list(arms), int(limit), name,
                                    lambda done, total, msg: bar.progress(done / total, text=f"{webapp.eta_text(done, total, started)} · {msg}"))
            st.success(f"{summary['run']}: {summary['computed']} answers computed, {summary['reused']} reused from the cache "
                       f"in {summary['seconds']:.0f} s")
            state.ab_report_pick = summary["run"]
        except ERRORS as exc:
            st.error(str(exc))

    runs = [r["name"] for r in webapp.ab_runs(home)]
    if runs:
        if state.get("ab_report_pick") not in runs:
            state.ab_report_pick = runs[0]
        chosen = st.selectbox("Report for run", runs, key="ab_report_pick")
        rep, files = webapp.ab_report(home, chosen)
        st.caption(f"{rep['questions']} questions answered by every arm; means (%) with 95% paired-bootstrap CIs")
        table = {arm: {m: f"{v['mean'] * 100:.1f} [{v['ci_low'] * 100:.1f}, {v['ci_high'] * 100:.1f}]"
                       for m, v in cells.items() if m != "latency_s"} for arm, cells in rep["arms"].items()}
        st.dataframe(table)
        cols = st.columns(2)
        if files.get("means"):
            cols[0].image(files["means"])
        if files.get("hit_at_k"):
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
        st.subheader("Answers")
        only_disagree = st.toggle("Only questions where the arms disagree (correct vs not)", key="ab_only_disagree")
        answers = webapp.ab_answers(home, chosen, only_disagreements=only_disagree)
        st.caption(f"{len(answers)} question(s)")
        st.dataframe(answers, hide_index=True, width="stretch")
        if len(runs) > 1:
            st.subheader("Compare two runs")
            a, b = st.columns(2)
            run_a = a.selectbox("Run A", runs, key="cmp_a")
            run_b = b.selectbox("Run B", runs, index=1, key="cmp_b")
            ra, rb = webapp.ab_report(home, run_a)[0], webapp.ab_report(home, run_b)[0]
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
            state.arena_round = webapp.new_arena_round(question or webapp.DEMO_QUESTION, a_collection, a_adapter)
        except ERRORS as exc:
            st.error(str(exc))
    current = state.get("arena_round")
    if current is not None:
        st.markdown(f"**{webapp.escape_markdown(current.question)}**")
        left, right = st.columns(2)
        pending = webapp.arena_streams(assistant, current, [s for s in ("a", "b") if s not in current.answers])
        for side, col in (("a", left), ("b", right)):
            with col:
                st.markdown(f"#### {side.upper()}")
                if side in current.answers:
                    st.markdown(webapp.escape_markdown(current.answers[side]))
                else:
                    try:
                        pieces = pending[side]
                        if isinstance(pieces, Exception):
                            raise pieces
                        st.write_stream(webapp.escape_markdown(p) for p in webapp.coalesce(pieces))
                        current.answers[side] = pieces.answer.text
                    except ERRORS as exc:
                        st.error(str(exc))
        if current.voted is None and set(current.answers) == {"a", "b"}:
            buttons = st.columns(4)
            for (outcome, label), button in zip(webapp.arena_outcomes().items(), buttons):
                if button.button(label, key=f"vote_{outcome}"):
                    webapp.arena_vote(home, current, outcome)
                    st.rerun()
        elif current.voted:
            shown = current.revealed()
            st.success(f"You voted **{webapp.arena_outcomes()[current.voted]}**. A was `{shown['a']}`, B was `{shown['b']}`.")
    board, caption = webapp.arena_leaderboard(home)
    if board["ratings"]:
        st.subheader(f"Leaderboard ({board['votes']} votes, Bradley-Terry)")
        st.dataframe([{"arm": r["arm"], "rating": round(r["rating"]), "95% interval": f"[{r['ci_low']:.0f}, {r['ci_high']:.0f}]",
                       "votes": r["votes"]} for r in board["ratings"]], hide_index=True)
        st.caption(caption + " Ratings have a prior that pulls them together, so few votes move them little.")
