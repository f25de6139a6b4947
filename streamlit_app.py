"""ragtune's assistant: chat with a collection (base / RAG / fine-tuned / both), manage collections, tune.

    streamlit run streamlit_app.py --server.headless true

A view only: every action goes through ``serving`` (see serving/webapp.py); no SQL, no torch here.
The workspace is $RAGTUNE_HOME; the serving config is $RAGTUNE_SERVE_CONFIG (YAML) when set.
"""

import streamlit as st

st.set_page_config(page_title="ragtune assistant", page_icon=":speech_balloon:", layout="wide")

page = st.navigation([
    st.Page("pages/chat.py", title="Chat", icon=":material/chat:", default=True),
    st.Page("pages/collections.py", title="Collections", icon=":material/folder:"),
    st.Page("pages/tuning.py", title="Tuning", icon=":material/model_training:"),
    st.Page("pages/ab.py", title="A/B testing", icon=":material/compare_arrows:"),
])
page.run()
