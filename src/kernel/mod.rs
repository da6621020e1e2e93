//! Thin layers over the kernel: rtnetlink, the `nft` command for table structure,
//! nf_tables element batches over netlink, and conntrack entries over ctnetlink.

pub mod conntrack;
pub mod netlink;
pub mod nft_cmd;
pub mod nft_elements;
