//! What the daemon tells `tartanctl`: the `/status` document.

pub mod status;
