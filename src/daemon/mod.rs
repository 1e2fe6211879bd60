//! The daemon (miehistod) and its client API; see issue 4.
