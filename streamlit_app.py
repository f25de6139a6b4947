"""ragtune's assistant: chat with a collection (base / RAG / fine-tuned / both), manage collections, tune, A/B.

    make demo                       # or: python -m serving.app_launch (starts loading the model at once)
    streamlit run streamlit_app.py  # the repo's .streamlit/config.toml binds localhost, no file watcher

A view only: every action goes through ``serving.webapp`` (and ``serving.tune_jobs``); no SQL, no torch.
The workspace is $RAGTUNE_HOME; the serving config is $RAGTUNE_SERVE_CONFIG (YAML) when set; an optional
password (its scrypt hash) and the allowed folders are in $RAGTUNE_HOME/app.yaml.
"""

import streamlit as st

from serving import webapp


def wait_for_engine() -> None:
    """While the model loads: a progress bar with the phase, the time so far and the estimate (the last
    load's duration), instead of a blank page. A failed load shows its error and stops the page."""
    engine = webapp.engine(home)
    if not engine.ready and not engine.error:
        bar = st.progress(0.0, text="Loading the model…")
        while not engine.ready and not engine.error:
            s = engine.status()
            estimate = (f" of about {webapp.format_duration(s['expected_s'])} (the last load)" if s["expected_s"]
                        else " (the first start takes about a minute on 2 CPU cores)")
            bar.progress(s["fraction"] if s["fraction"] is not None else min(0.9, s["elapsed_s"] / 90),
                         text=f"Loading the model ({s['phase']}): {webapp.format_duration(s['elapsed_s'])}{estimate}. "
                              "It loads once, for every user.")
            engine.wait(0.5)
        bar.empty()
    if engine.error:
        st.error(f"The model could not be loaded: {engine.error}. Check $RAGTUNE_SERVE_CONFIG, then reload the page.")
        st.stop()


st.set_page_config(page_title="ragtune assistant", page_icon=":speech_balloon:", layout="wide")

home = webapp.app_home()
webapp.engine(home)  # starts loading the model in the background (no-op when already started)

if webapp.password_required(home) and not st.session_state.get("authenticated"):
    st.title("ragtune assistant")
    with st.form("login"):
        password = st.text_input("Password", type="password", key="login_password")
        entered = st.form_submit_button("Enter")
    if entered:
        if webapp.check_password(home, password):
            st.session_state.authenticated = True
            st.rerun()
        st.error("Wrong password.")
    st.stop()

chat = st.Page("pages/chat.py", title="Chat", icon=":material/chat:", default=True)
ab = st.Page("pages/ab.py", title="A/B testing", icon=":material/compare_arrows:")
page = st.navigation([
    chat,
    st.Page("pages/collections.py", title="Collections", icon=":material/folder:"),
    st.Page("pages/tuning.py", title="Tuning", icon=":material/model_training:"),
    ab,
])
if page.url_path in (chat.url_path, ab.url_path):  # the pages that answer questions need the model
    wait_for_engine()
page.run()
