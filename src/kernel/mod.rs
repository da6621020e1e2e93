//! Thin layers over the kernel: rtnetlink, the `nft` command for table structure, and
//! nf_tables element batches over netlink.

pub mod netlink;
pub mod nft_cmd;
pub mod nft_elements;
