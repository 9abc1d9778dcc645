"""ITAE Lab dashboard: `streamlit run app/main.py`. The pages live in app/pages/, shared state in app/state.py."""
import streamlit as st

import state

st.set_page_config(page_title="ITAE Lab", page_icon=":material/search:", layout="wide")
page = st.navigation(
    [
        st.Page("pages/data_model.py", title="Data & model", icon=":material/dataset:", default=True),
        st.Page("pages/norms.py", title="Norms & θ", icon=":material/bar_chart:"),
        st.Page("pages/attention.py", title="Attention maps", icon=":material/visibility:"),
        st.Page("pages/embeddings.py", title="Embeddings", icon=":material/scatter_plot:"),
        st.Page("pages/metrics.py", title="Metrics", icon=":material/leaderboard:"),
        st.Page("pages/about.py", title="About the method", icon=":material/school:"),
    ]
)
page.run()
with st.sidebar:
    state.sidebar_status()
