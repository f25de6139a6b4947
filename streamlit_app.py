"""ragtune's assistant: chat with a collection (base / RAG / fine-tuned / both), manage collections, tune, A/B.

    make demo                       # or: python -m serving.app_launch (starts loading the model at once)
    streamlit run streamlit_app.py  # the repo's .streamlit/config.toml binds localhost, no file watcher

A view only: every action goes through ``serving.webapp`` (and ``serving.tune_jobs``); no SQL, no torch.
The workspace is $RAGTUNE_HOME; the serving config is $RAGTUNE_SERVE_CONFIG (YAML) when set; an optional
password (its scrypt hash) and the allowed folders are in $RAGTUNE_HOME/app.yaml.
"""

import streamlit as st

from serving import webapp

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

page = st.navigation([
    st.Page("pages/chat.py", title="Chat", icon=":material/chat:", default=True),
    st.Page("pages/collections.py", title="Collections", icon=":material/folder:"),
    st.Page("pages/tuning.py", title="Tuning", icon=":material/model_training:"),
    st.Page("pages/ab.py", title="A/B testing", icon=":material/compare_arrows:"),
])
page.run()
