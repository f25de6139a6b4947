"""Chat: pick collection, mode and adapter; answers stream in, with sources, timings and a vote.

Questions and answers are shown as text (escaped Markdown): an image or link in either is never fetched."""

import streamlit as st

from serving import webapp
from serving.config import MODES, ServingError
from serving.modes import uses_adapter, uses_retrieval

home = str(webapp.app_home())
if webapp.password_required(home) and not st.session_state.get("authenticated"):
    st.stop()  # the entry script asks for the password; this guards a page run on its own
state = st.session_state
state.setdefault("messages", [])  # this user's conversation: dicts with role, content, answer (or error)
state.setdefault("chat_id", None)

st.title("Chat")
assistant = webapp.engine(home).wait()  # streamlit_app.py shows the loading progress first
if assistant is None:
    st.error(f"The model could not be loaded: {webapp.engine(home).error}")
    st.stop()
collections = webapp.collections(home)
usable = webapp.usable_adapters(assistant)

# choices survive reruns and pages: keep them in session state, fall back when one disappears
if state.get("chat_collection") not in collections:
    state.chat_collection = (webapp.DEMO_COLLECTION if webapp.DEMO_COLLECTION in collections
                             else collections[0] if collections else None)
if state.get("chat_adapter") not in usable:
    state.chat_adapter = usable[0] if usable else None
# the collection's promoted adapter becomes the choice whenever it changes (a promotion or rollback made
# elsewhere is picked up on the next rerun, no restart); a choice made after that is kept
promoted = webapp.promoted_adapter(home, state.chat_collection)
if promoted != state.get("chat_promoted_seen"):
    state.chat_promoted_seen = promoted
    if promoted in usable:
        state.chat_adapter = promoted
        if state.get("mode", "rag") == "rag":
            state.mode = "rag+ft"
with st.sidebar:
    mode = st.radio("Mode", MODES, index=1, horizontal=True, key="mode",
                    help="base: the model alone · rag: retrieved sources · ft: a fine-tuned adapter · rag+ft: both")
    collection = st.selectbox("Collection", collections, key="chat_collection", placeholder="none yet",
                              disabled=not uses_retrieval(mode))
    k = st.slider("Sources (k)", 1, 10, 4, key="k", disabled=not uses_retrieval(mode))
    adapter = st.selectbox("Adapter", usable, key="chat_adapter", placeholder="none yet",
                           disabled=not uses_adapter(mode))
    if st.button("New chat", icon=":material/add:"):
        state.messages, state.chat_id = [], None
        st.rerun()


def missing_parts() -> list[str]:
    """Hints for what the chosen mode needs and does not have; shown next to the question box."""
    hints = []
    if uses_adapter(mode) and not usable:
        hints.append(f"Mode **{mode}** needs a fine-tuned adapter and there is none yet. Train the demo adapter on the "
                     "**Tuning** page (about 6 minutes on 2 CPU cores; the chat keeps working meanwhile), or in a "
                     f"terminal: `ragtune tune name={webapp.DEMO_ADAPTER} data=corpora/corvida/qa/train.jsonl max_steps=60`. "
                     "Until then use mode base or rag.")
    if uses_retrieval(mode) and not collections:
        hints.append("No collection yet. Create one on the **Collections** page, or: `ragtune index corpora/corvida/docs "
                     "--collection corvida`.")
    return hints


def show_sources(answer: dict) -> None:
    label = webapp.sources_label(answer)
    if label is None:
        return
    with st.expander(label, expanded=False):
        if answer.get("refused"):
            st.caption("These passages were the closest matches to the question, but none was close enough to answer from.")
        # where the answer stands in a source (grounded decoding's copied span, or a plain answer found again)
        spans = {}
        for sp in answer.get("spans") or []:
            spans.setdefault(sp["n"], sp)
        for s in answer["sources"]:
            sim = f" · similarity {s['similarity']:.2f}" if s.get("similarity") is not None else ""
            mark = " · **cited**" if s.get("cited") else ""
            st.markdown(f"**[{s['n']}]** {webapp.escape_markdown(s['doc'])} · characters {s['start']}-{s['end']}{sim}{mark}")
            document = webapp.document_text(home, answer["collection"], s["doc"]) if answer.get("collection") else None
            if document is not None:
                span = spans.get(s["n"], s)  # the answer's words highlighted, else the whole passage
                st.markdown(webapp.highlighted_span(document, span["start"], span["end"]))
            else:  # the document was deleted since: show the stored chunk as plain text
                st.text(s["text"])


def show_answer(answer: dict) -> None:
    if answer.get("refused"):
        reason = answer.get("refusal_reason") or "no passage in the collection is close enough to the question"
        st.caption(f"Not answered: {webapp.escape_markdown(reason)}")
    show_sources(answer)
    if answer.get("notes"):
        st.caption(webapp.escape_markdown("; ".join(answer["notes"])))
    extra = f"{answer['mode']}" + (f" · {answer['adapter']}" if answer.get("adapter") else "")
    st.caption(f"{extra} · {webapp.timings_caption(answer.get('timings') or {})}")
    message_id = answer.get("message_id")
    if message_id:
        vote = st.feedback("thumbs", key=f"vote_{message_id}")
        if vote is not None and vote != answer.get("vote"):
            webapp.set_feedback(home, message_id, 1 if vote == 1 else -1)
            answer["vote"] = vote
        correction_form(answer, message_id)


NOT_IN_SOURCES = "not in the sources"


def correction_form(answer: dict, message_id: int) -> None:
    """Write the right answer (and which source holds it): stored with the question, mode, adapter,
    collection version and the sources this answer saw; `ragtune feedback export` makes training rows of it."""
    with st.expander("Correct this answer", icon=":material/edit:"):
        with st.form(f"correct_{message_id}", clear_on_submit=False, border=False):
            text = st.text_area("The right answer", key=f"correction_{message_id}", max_chars=4000)
            options = ["(not given)"] + [f"[{s['n']}] {s['doc']}" for s in answer.get("sources") or []] + [NOT_IN_SOURCES]
            where = st.selectbox("Which source holds it?", options, key=f"correction_source_{message_id}")
            sent = st.form_submit_button("Save correction")
    # the outcome shows below the expander: the page reruns on submit and the expander may come back closed
    if sent:
        source_n = int(where[1:where.index("]")]) if where.startswith("[") else None
        try:
            cid = webapp.record_correction(home, message_id, text, source_n, where == NOT_IN_SOURCES)
            answer["corrected"] = cid
            st.success(f"Saved (correction {cid}). It becomes training data on the Tuning page's \"From feedback\" panel.")
        except webapp.USER_ERRORS as exc:
            st.error(str(exc))
    elif answer.get("corrected"):
        st.caption(f"Corrected (correction {answer['corrected']}): it becomes training data on the Tuning page.")


for message in state.messages:
    with st.chat_message(message["role"]):
        if message.get("error"):
            st.error(message["error"])
            continue
        st.markdown(webapp.escape_markdown(message["content"]))
        if message["role"] == "assistant":
            show_answer(message["answer"])

for hint in missing_parts():
    st.info(hint)

question = st.chat_input("Ask a question, e.g. " + webapp.DEMO_QUESTION)
if question:
    history = [{"role": m["role"], "content": m["content"]} for m in state.messages if not m.get("error")
               and not m.get("failed")]
    with st.chat_message("user"):
        st.markdown(webapp.escape_markdown(question))
    with st.chat_message("assistant"):
        try:
            stream = assistant.stream(question, mode, collection if uses_retrieval(mode) else None,
                                      adapter if uses_adapter(mode) else None, history, k=k, chat_id=state.chat_id)
        except ServingError as exc:
            # kept in the conversation, so the question and its error survive the next rerun
            st.error(str(exc))
            state.messages.append({"role": "user", "content": question, "failed": True})
            state.messages.append({"role": "assistant", "content": "", "error": str(exc)})
        else:
            waiting = webapp.queue_note(assistant)
            if waiting:
                st.caption(waiting)
            st.write_stream(webapp.escape_markdown(piece) for piece in webapp.coalesce(stream))
            answer = webapp.answer_view(stream.answer)
            state.chat_id = stream.answer.chat_id
            state.messages.append({"role": "user", "content": question})
            state.messages.append({"role": "assistant", "content": stream.answer.text, "answer": answer})
            show_answer(answer)
