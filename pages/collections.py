"""Collections: create, upload and index files, index a server folder (inside the allowed roots), inspect,
delete, re-index."""

import time

import streamlit as st

from serving import webapp

home = str(webapp.app_home())
if webapp.password_required(home) and not st.session_state.get("authenticated"):
    st.stop()  # the entry script asks for the password; this guards a page run on its own
state = st.session_state
ERRORS = webapp.USER_ERRORS

st.title("Collections")
table = st.container()  # filled last, so a collection made by this run shows at once


def progress_bar(label: str):
    bar = st.progress(0.0, text=label)
    started = time.time()

    def report(done: int, total: int, message: str) -> None:
        bar.progress(done / max(total, 1), text=f"{label}: {webapp.eta_text(done, max(total, 1), started)} · {message[-60:]}")
    return report


def show_report(name: str, report) -> None:
    st.success(f"{name}: {report.added} added, {report.updated} updated, {report.unchanged} unchanged, "
               f"{report.deleted} deleted ({report.total_documents} documents, {report.total_chunks} chunks)")
    for item in report.failed:
        st.warning(f"{item['path']}: {item['error']} (not kept)")


names = webapp.collections(home)
state.setdefault("upload_collection", webapp.DEMO_COLLECTION if not names or webapp.DEMO_COLLECTION in names else names[0])
add_tab, folder_tab = st.tabs(["Upload files", "Index a server folder"])
with add_tab:
    # the collection field is outside the form and keyed, so it keeps what the user typed after an upload
    target = st.text_input("Collection (new or existing)", key="upload_collection")
    with st.form("upload", clear_on_submit=True):
        files = st.file_uploader("Documents", accept_multiple_files=True, type=webapp.UPLOAD_TYPES)
        submitted = st.form_submit_button("Upload and index")
    if submitted:
        try:
            report = webapp.upload_and_index(home, target.strip(), [(f.name, f.getvalue()) for f in files or []],
                                             progress=progress_bar(f"indexing {target}"))
            show_report(target, report)
            state.inspect = target.strip()
        except ERRORS as exc:
            st.error(str(exc))
with folder_tab:
    roots = ", ".join(str(r) for r in webapp.index_roots(home))
    with st.form("folder"):
        folder_target = st.text_input("Collection (new or existing)", key="folder_collection")
        path = st.text_input("Folder on this server", placeholder=str(webapp.DEMO_CORPUS / "corvida" / "docs"),
                             key="folder_path", help="Only folders under the allowed roots (index_roots in app.yaml)")
        sync = st.checkbox("Delete documents whose files are gone (sync)")
        submitted_folder = st.form_submit_button("Index folder")
    st.caption(f"Folders the app may index: {roots} (index_roots in $RAGTUNE_HOME/app.yaml)")
    if submitted_folder:
        try:
            show_report(folder_target, webapp.index_folder(home, folder_target.strip(), path, sync=sync,
                                                           progress=progress_bar(f"indexing {folder_target}")))
            state.inspect = folder_target.strip()
        except ERRORS as exc:
            st.error(str(exc))

names = webapp.collections(home)
if names:
    st.subheader("Inspect")
    if state.get("inspect") not in names:
        state.inspect = names[0]
    name = st.selectbox("Collection", names, key="inspect")
    docs = webapp.documents(home, name)
    st.dataframe(docs, hide_index=True, width="stretch")
    chosen = st.multiselect("Documents to delete", [d["path"] for d in docs], key="delete_docs")
    if st.button("Delete selected documents", disabled=not chosen):
        count = webapp.delete_documents(home, name, chosen)
        state.deleted_message = f"{count} document(s) deleted from {name}"
        del state["delete_docs"]
        st.rerun()
    if state.get("deleted_message"):
        st.success(state.pop("deleted_message"))
    with st.expander("Re-index with another embedding model"):
        model = st.text_input("Embedding model", value="default", help="'default', a local folder or a hub id")
        if st.button("Re-index"):
            try:
                report = webapp.reindex(home, name, model, progress=progress_bar(f"re-indexing {name}"))
                st.success(f"{name}: {report.total_documents} documents re-embedded into {report.total_chunks} chunks")
            except ERRORS as exc:
                st.error(str(exc))
    with st.expander("Delete the whole collection"):
        sure = st.checkbox(f"Yes, delete {name} and its index", key=f"sure_drop_{name}")
        if st.button("Delete collection", type="primary", disabled=not sure):
            webapp.drop_collection(home, name)
            st.rerun()

with table:
    rows = webapp.collection_rows(home)
    if rows:
        st.dataframe(rows, hide_index=True, width="stretch")
    else:
        st.info("No collection yet: upload files below, or index a folder on this server.")
