"""ITAE Lab dashboard: `streamlit run app/main.py`. The pages live in app/views/, shared state in app/state.py.

Not app/pages/: Streamlit lists a pages/ folder beside the entry file by its file names, and a fresh
load showed those in the sidebar until st.navigation replaced them.
"""
import streamlit as st

import place
import state

st.set_page_config(page_title="ITAE Lab", page_icon=":material/search:", layout="wide")
place.restore()
state.umap_warm_up()  # numba compiles UMAP in the background while the first page is used
page = st.navigation(
    [
        st.Page("views/data_model.py", title="Data & model", icon=":material/dataset:", default=True),
        st.Page("views/norms.py", title="Norms & θ", icon=":material/bar_chart:"),
        st.Page("views/attention.py", title="Attention maps", icon=":material/visibility:"),
        st.Page("views/embeddings.py", title="Embeddings", icon=":material/scatter_plot:"),
        st.Page("views/metrics.py", title="Metrics", icon=":material/leaderboard:"),
        st.Page("views/compare.py", title="Compare methods", icon=":material/compare_arrows:"),
        st.Page("views/about.py", title="About the method", icon=":material/school:"),
    ]
)
# The badge of the teaching model tops every page; filled again once the page has run, as the Data & model
# page may have switched the model.
badge = st.empty()
state.planted_badge(badge)
place.show_notes()
page.run()
state.planted_badge(badge)
with st.sidebar:
    state.sidebar_status()
place.write()
