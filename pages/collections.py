"""Collections: create, upload and index files, index a server folder, inspect, delete, re-index."""

import streamlit as st

from rag.collection import CollectionError
from core.config import ConfigError
from rag.documents import SUPPORTED_SUFFIXES
from serving import webapp

home = str(webapp.app_home())
ws = webapp.workspace(home)

st.title("Collections")
rows = ws.list()
if rows:
    st.dataframe([{k: r[k] for k in ("name", "documents", "chunks", "embedding_model", "index_type", "version")} for r in rows],
                 hide_index=True, width="stretch")
else:
    st.info("No collection yet: upload files below, or index a folder on this server.")


def progress_bar(label: str):
    bar = st.progress(0.0, text=label)

    def report(done: int, total: int, message: str) -> None:
        bar.progress(done / max(total, 1), text=f"{label}: {done}/{total} {message[-60:]}")
    return report


def show_report(name: str, report) -> None:
    st.success(f"{name}: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
               f"{report.deleted} deleted ({report.total_documents} documents, {report.total_chunks} chunks)")
    for item in report.failed:
        st.warning(f"{item['path']}: {item['error']}")


add_tab, folder_tab = st.tabs(["Upload files", "Index a server folder"])
with add_tab:
    with st.form("upload", clear_on_submit=True):
        target = st.text_input("Collection (new or existing)", value=webapp.DEMO_COLLECTION if not rows else rows[0]["name"])
        files = st.file_uploader("Documents", accept_multiple_files=True, type=[s.lstrip(".") for s in SUPPORTED_SUFFIXES])
        submitted = st.form_submit_button("Upload and index")
    if submitted:
        try:
            if not files:
                raise CollectionError("choose at least one file to upload")
            folder = webapp.upload_folder(home, target)
            webapp.save_uploads(home, target, [(f.name, f.getvalue()) for f in files])
            show_report(target, ws.index(target, [folder], progress=progress_bar(f"indexing {target}")))
        except (CollectionError, ConfigError, ValueError) as exc:
            st.error(str(exc))
with folder_tab:
    with st.form("folder"):
        target = st.text_input("Collection (new or existing)", key="folder_collection")
        path = st.text_input("Folder on this server", placeholder="/data/manuals")
        sync = st.checkbox("Delete documents whose files are gone (sync)")
        submitted = st.form_submit_button("Index folder")
    if submitted:
        try:
            show_report(target, ws.index(target, [path], sync=sync, progress=progress_bar(f"indexing {target}")))
        except (CollectionError, ConfigError, ValueError) as exc:
            st.error(str(exc))

names = ws.names()
if names:
    st.subheader("Inspect")
    name = st.selectbox("Collection", names, key="inspect")
    col = ws.get(name)
    documents = col.documents()
    st.dataframe([{"path": d["path"], "chunks": d["chunks"], "size": d["size"]} for d in documents],
                 hide_index=True, width="stretch")
    chosen = st.multiselect("Documents to delete", [d["path"] for d in documents])
    if st.button("Delete selected documents", disabled=not chosen):
        st.success(f"{col.delete_documents(chosen)} document(s) deleted from {name}")
        st.rerun()
    with st.expander("Re-index with another embedding model"):
        model = st.text_input("Embedding model", value="default", help="'default', a local folder or a hub id")
        if st.button("Re-index"):
            try:
                report = ws.reindex(name, model, progress=progress_bar(f"re-indexing {name}"))
                st.success(f"{name}: {report.total_documents} documents re-embedded into {report.total_chunks} chunks")
            except (CollectionError, ConfigError, ValueError) as exc:
                st.error(str(exc))
    with st.expander("Delete the whole collection"):
        sure = st.checkbox(f"Yes, delete {name} and its index", key="sure_drop")
        if st.button("Delete collection", type="primary", disabled=not sure):
            ws.drop(name)
            st.rerun()
