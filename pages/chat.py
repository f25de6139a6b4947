"""Chat: pick collection, mode and adapter; answers stream in, with sources, timings and a vote."""

import streamlit as st

from serving import webapp
from serving.config import MODES, ServingError
from serving.modes import uses_adapter, uses_retrieval

home = str(webapp.app_home())
ws = webapp.workspace(home)
store = webapp.chat_store(home)

st.title("Chat")
state = st.session_state
state.setdefault("messages", [])  # this user's conversation: dicts with role, content, answer
state.setdefault("chat_id", None)

collections = ws.names()
with st.sidebar:
    mode = st.radio("Mode", MODES, index=1, horizontal=True, key="mode",
                    help="base: the model alone · rag: retrieved sources · ft: a fine-tuned adapter · rag+ft: both")
    collection = st.selectbox("Collection", collections, key="collection",
                              index=(collections.index(webapp.DEMO_COLLECTION) if webapp.DEMO_COLLECTION in collections
                                     else 0 if collections else None),
                              placeholder="none yet", disabled=not uses_retrieval(mode))
    k = st.slider("Sources (k)", 1, 10, 4, key="k", disabled=not uses_retrieval(mode))
    with st.spinner("Loading the model (once for all users)..."):
        assistant = webapp.assistant(home, webapp.serve_config_json())
    usable = [a["name"] for a in assistant.generator.available_adapters() if a.get("usable")]
    adapter = st.selectbox("Adapter", usable, index=0 if usable else None, key="adapter", placeholder="none yet",
                           disabled=not uses_adapter(mode))
    if st.button("New chat", icon=":material/add:"):
        state.messages, state.chat_id = [], None
        st.rerun()

needs_adapter = uses_adapter(mode)
if needs_adapter and not usable:
    st.info("No fine-tuned adapter yet. Train the demo adapter on the **Tuning** page (a few minutes on a laptop "
            f"CPU; the chat keeps working meanwhile), or in a terminal: `ragtune tune name={webapp.DEMO_ADAPTER} "
            "data=corpora/corvida/qa/train.jsonl max_steps=60`. Until then use mode base or rag.")
if uses_retrieval(mode) and not collections:
    st.info("No collection yet. Create one on the **Collections** page, or: `ragtune index corpora/corvida/docs "
            "--collection corvida`.")


def show_sources(answer: dict) -> None:
    sources = answer.get("sources") or []
    if not sources:
        return
    cited = [s for s in sources if s.get("cited")]
    label = (f"Sources: {len(cited)} cited of {len(sources)}" if cited else f"Sources ({len(sources)})")
    with st.expander(label, expanded=False):
        for s in sources:
            sim = f" · similarity {s['similarity']:.2f}" if s.get("similarity") is not None else ""
            mark = " · **cited**" if s.get("cited") else ""
            st.markdown(f"**[{s['n']}]** {webapp.escape_markdown(s['doc'])} · characters {s['start']}-{s['end']}{sim}{mark}")
            try:
                document = ws.get(answer["collection"]).document_text(s["doc"])
                st.markdown(webapp.highlighted_span(document, s["start"], s["end"]))
            except Exception:  # the document was deleted since: show the stored chunk as plain text
                st.text(s["text"])


def show_answer_footer(i: int, answer: dict) -> None:
    if answer.get("notes"):
        st.caption("; ".join(answer["notes"]))
    caption = webapp.timings_caption(answer.get("timings") or {})
    extra = f"{answer['mode']}" + (f" · {answer['adapter']}" if answer.get("adapter") else "")
    st.caption(f"{extra} · {caption}")
    message_id = answer.get("message_id")
    if message_id:
        vote = st.feedback("thumbs", key=f"vote_{message_id}")
        if vote is not None and vote != answer.get("vote"):
            store.set_feedback(message_id, 1 if vote == 1 else -1)
            answer["vote"] = vote


for i, message in enumerate(state.messages):
    with st.chat_message(message["role"]):
        st.markdown(message["content"])
        if message["role"] == "assistant":
            show_sources(message["answer"])
            show_answer_footer(i, message["answer"])

question = st.chat_input("Ask a question, e.g. " + webapp.DEMO_QUESTION)
if question:
    history = [{"role": m["role"], "content": m["content"]} for m in state.messages if not m.get("error")]
    with st.chat_message("user"):
        st.markdown(question)
    with st.chat_message("assistant"):
        try:
            stream = assistant.stream(question, mode, collection if uses_retrieval(mode) else None,
                                      adapter if needs_adapter else None, history, k=k, chat_id=state.chat_id)
        except ServingError as exc:
            st.error(str(exc))
        else:
            st.write_stream(stream)
            answer = stream.answer.to_dict()
            answer.pop("hits", None)
            state.chat_id = stream.answer.chat_id
            state.messages.append({"role": "user", "content": question})
            state.messages.append({"role": "assistant", "content": stream.answer.text, "answer": answer})
            show_sources(answer)
            show_answer_footer(len(state.messages) - 1, answer)
