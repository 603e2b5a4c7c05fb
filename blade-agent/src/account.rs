//! Which accounts may have a desktop, and what the agent needs to know to run one as them.
use crate::error::AgentError;
use nix::unistd::{Gid, Group, Uid, User, getgrouplist};
use std::ffi::CString;
use std::path::PathBuf;
use vncdispatch_proto::rules::validate_username;

/// A validated, existing, non-system account.
#[derive(Debug, Clone)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// User id the desktop runs as.
    pub uid: Uid,
    /// Primary group.
    pub gid: Gid,
    /// Supplementary groups, as `initgroups` would set them, so the desktop has the user's
    /// usual rights (audio, shared folders) and none of root's.
    pub groups: Vec<Gid>,
    /// Home directory from the passwd entry.
    pub home: PathBuf,
    /// Login shell, passed on as SHELL.
    pub shell: PathBuf,
}

impl Account {
    /// The rfbauth file the agent writes and passes to Xvnc.
    pub fn vncpasswd_path(&self) -> PathBuf {
        self.home.join(".vncpasswd")
    }
}

/// The uids that may have a desktop.
#[derive(Debug, Clone, Copy)]
pub struct UidRange {
    /// Lowest allowed uid (0 is refused whatever this says).
    pub min: u32,
    /// Highest allowed uid.
    pub max: u32,
}

impl UidRange {
    /// True for a uid that may have a desktop: in the range, and never root.
    pub fn allows(self, uid: u32) -> bool {
        uid != 0 && (self.min..=self.max).contains(&uid)
    }
}

/// Looks up `name` for a desktop: it must pass the shared username rules, exist, and have a uid
/// in `uids` (never 0, whatever the configuration says). Blocking (NSS).
pub fn lookup(name: &str, uids: UidRange) -> Result<Account, AgentError> {
    validate_username(name)?;
    let user = User::from_name(name)
        .map_err(|e| AgentError::io(format!("looking up account {name:?}"), e.into()))?
        .ok_or_else(|| AgentError::UnknownUser(name.to_owned()))?;
    from_user(user, uids)
}

/// Like [`lookup`], by uid (for servers found running on the blade).
pub fn lookup_uid(uid: u32, uids: UidRange) -> Result<Account, AgentError> {
    let user = User::from_uid(Uid::from_raw(uid))
        .map_err(|e| AgentError::io(format!("looking up uid {uid}"), e.into()))?
        .ok_or_else(|| AgentError::UnknownUser(format!("uid {uid}")))?;
    from_user(user, uids)
}

fn from_user(user: User, uids: UidRange) -> Result<Account, AgentError> {
    let uid = user.uid.as_raw();
    if !uids.allows(uid) {
        return Err(AgentError::SystemAccount {
            user: user.name,
            uid,
            min_uid: uids.min.max(1),
            max_uid: uids.max,
        });
    }
    // A passwd entry whose name breaks the rules (NSS can return anything) is not ours to run.
    validate_username(&user.name)?;
    let cname =
        CString::new(user.name.clone()).map_err(|_| AgentError::UnknownUser(user.name.clone()))?;
    let groups = getgrouplist(&cname, user.gid)
        .map_err(|e| AgentError::io(format!("reading groups of {:?}", user.name), e.into()))?;
    if groups.iter().any(|g| g.as_raw() == 0) {
        // Membership in group root is a system account in disguise.
        let root = Group::from_gid(Gid::from_raw(0))
            .ok()
            .flatten()
            .map(|g| g.name);
        return Err(AgentError::UnsafeHome {
            user: user.name,
            why: format!(
                "the account is in group {} (gid 0)",
                root.unwrap_or_else(|| "0".into())
            ),
        });
    }
    Ok(Account {
        name: user.name,
        uid: user.uid,
        gid: user.gid,
        groups,
        home: user.dir,
        shell: user.shell,
    })
}
