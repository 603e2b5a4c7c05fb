//! PAM for a desktop, as a login runs it: the account stage (expired or locked accounts, nologin)
//! and the session stage (pam_limits, pam_env, pam_systemd…), for a service of our own,
//! `/etc/pam.d/vncdispatch` (shipped in `deploy/pam/`), as TigerVNC's `vncsession` does with
//! `/etc/pam.d/tigervnc`. There is no auth stage: the dispatcher decided who gets a desktop.
//!
//! A thin safe wrapper over the raw libpam bindings of `pam-sys` (the higher-level PAM crates
//! either want an auth stage or generate their bindings with libclang at build time). No
//! prompt is ever answered; what modules say (pam_unix's "Your account has expired…") is
//! collected and becomes the error's message.
use pam_sys::raw;
use pam_sys::{PamConversation, PamHandle, PamMessage, PamResponse};
use std::ffi::{CStr, CString, c_char, c_int, c_void};

const PAM_SUCCESS: c_int = 0;
const PAM_BUF_ERR: c_int = 5;
const PAM_CONV_ERR: c_int = 19;
const PAM_ERROR_MSG: c_int = 3;
const PAM_TEXT_INFO: c_int = 4;
const PAM_USER: c_int = 2;
const PAM_TTY: c_int = 3;
const PAM_SILENT: c_int = 0x8000;
const PAM_ESTABLISH_CRED: c_int = 0x0002;
const PAM_DELETE_CRED: c_int = 0x0004;
/// Longest module message kept, and how many.
const MAX_MESSAGE: usize = 256;
const MAX_MESSAGES: usize = 8;

/// A PAM stage refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{stage}: {message}")]
pub struct PamError {
    /// Which call: "account", "session", "start".
    pub stage: &'static str,
    /// PAM's return code (PAM_ACCT_EXPIRED is 13, PAM_PERM_DENIED 6…).
    pub code: i32,
    /// What the modules said, else `pam_strerror`.
    pub message: String,
}

impl PamError {
    /// True when PAM refused this user (expired, locked, unknown, not allowed here), as
    /// opposed to PAM or a module failing (a misconfiguration, logind not answering): the
    /// first is the user's answer on every blade, the second this blade's failure.
    pub fn is_denial(&self) -> bool {
        // PERM_DENIED, AUTH_ERR (Debian's common-account turns an expired account into
        // pam_deny's), USER_UNKNOWN, NEW_AUTHTOK_REQD, ACCT_EXPIRED.
        matches!(self.code, 6 | 7 | 10 | 12 | 13)
    }
}

/// One PAM transaction for one user; ended (`pam_end`) on drop.
pub struct Pam {
    handle: *mut PamHandle,
    /// The conversation and what modules said: libpam holds raw pointers to both for the
    /// whole transaction, so they are leaked into raw pointers here and freed in `Drop`.
    conv: *mut PamConversation,
    said: *mut Vec<String>,
    session_open: bool,
}

impl Pam {
    /// Starts a transaction of `service` for nobody yet: libpam reads the service's files and
    /// loads its modules now (most of what PAM costs a start), which the helper does before
    /// its request comes; [`Pam::for_user`] names the user. No module runs before that.
    pub fn start(service: &str) -> Result<Pam, PamError> {
        let c_service =
            CString::new(service).map_err(|_| start_error("bad service name".into()))?;
        let said = Box::into_raw(Box::new(Vec::<String>::new()));
        let conv = Box::into_raw(Box::new(PamConversation {
            conv: Some(converse),
            data_ptr: said.cast(),
        }));
        let mut handle: *const PamHandle = std::ptr::null();
        // SAFETY: the service string is NUL-terminated and outlives the call (libpam copies
        // it); a NULL user is PAM's own way to name the user later (pam_set_item), as login
        // does; `conv` and `said` are leaked boxes that stay valid until `Drop` frees them
        // after pam_end, or right below if pam_start fails.
        let rc = unsafe { raw::pam_start(c_service.as_ptr(), std::ptr::null(), conv, &mut handle) };
        if rc != PAM_SUCCESS || handle.is_null() {
            // SAFETY: libpam kept nothing; these are the boxes leaked above, freed once.
            unsafe {
                drop(Box::from_raw(conv));
                drop(Box::from_raw(said));
            }
            return Err(start_error(format!("pam_start failed ({rc})")));
        }
        Ok(Pam {
            handle: handle as *mut PamHandle,
            conv,
            said,
            session_open: false,
        })
    }

    /// Names the transaction's user, and its tty item `tty` — never an X display (`:N`):
    /// pam_systemd would connect to that display's socket as root, and a user can plant one
    /// that never answers; the session type goes in the PAM environment instead.
    pub fn for_user(&mut self, user: &str, tty: &str) -> Result<(), PamError> {
        let c_user = CString::new(user).map_err(|_| start_error("bad user name".into()))?;
        let c_tty = CString::new(tty).map_err(|_| start_error("bad tty".into()))?;
        for (item, value) in [(PAM_USER, &c_user), (PAM_TTY, &c_tty)] {
            // SAFETY: the handle is live; libpam copies the string item.
            let rc = unsafe { raw::pam_set_item(self.handle, item, value.as_ptr().cast()) };
            self.check("start", rc)?;
        }
        for var in ["XDG_SESSION_TYPE=x11", "XDG_SESSION_CLASS=user"] {
            let v = CString::new(var).map_err(|_| start_error("bad variable".into()))?;
            // SAFETY: the handle is live; libpam copies the string.
            let rc = unsafe { raw::pam_putenv(self.handle, v.as_ptr()) };
            self.check("start", rc)?;
        }
        Ok(())
    }

    /// The account stage: may this user log in now (expiry, lock, nologin, access rules)?
    pub fn account(&mut self) -> Result<(), PamError> {
        // SAFETY: the handle is live until drop.
        let rc = unsafe { raw::pam_acct_mgmt(self.handle, 0) };
        self.check("account", rc)
    }

    /// Establishes credentials and opens the session (limits, environment, cgroup).
    pub fn open_session(&mut self) -> Result<(), PamError> {
        // SAFETY: the handle is live until drop.
        let rc = unsafe { raw::pam_setcred(self.handle, PAM_ESTABLISH_CRED | PAM_SILENT) };
        self.check("session", rc)?;
        // SAFETY: as above.
        let rc = unsafe { raw::pam_open_session(self.handle, PAM_SILENT) };
        self.check("session", rc)?;
        self.session_open = true;
        Ok(())
    }

    /// The environment the modules set (pam_env, pam_systemd's XDG_RUNTIME_DIR…).
    pub fn env(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        // SAFETY: pam_getenvlist returns a NULL-terminated array of malloc'd strings that the
        // caller owns; each is read, then freed, then the array.
        unsafe {
            let list = raw::pam_getenvlist(self.handle);
            if list.is_null() {
                return out;
            }
            let mut i = 0;
            loop {
                let entry = *list.add(i);
                if entry.is_null() {
                    break;
                }
                let text = CStr::from_ptr(entry).to_string_lossy().into_owned();
                if let Some((k, v)) = text.split_once('=') {
                    out.push((k.to_owned(), v.to_owned()));
                }
                libc::free(entry as *mut c_void);
                i += 1;
            }
            libc::free(list as *mut c_void);
        }
        out
    }

    /// For a forked child that goes on as the user: leaves the transaction to the parent,
    /// which closes the session; ending it here too would run the modules' clean-up twice.
    /// (The child's copies of the boxes are not freed: it execs or exits soon.)
    pub fn forget(self) {
        std::mem::forget(self);
    }

    fn check(&mut self, stage: &'static str, rc: c_int) -> Result<(), PamError> {
        if rc == PAM_SUCCESS {
            return Ok(());
        }
        // SAFETY: `said` is valid until Drop; libpam writes it only inside calls on this
        // handle, and none is running while this one reads it.
        let said = unsafe { &*self.said };
        let message = if said.is_empty() {
            // SAFETY: pam_strerror returns a static string (or NULL) for any code.
            let s = unsafe { raw::pam_strerror(self.handle, rc) };
            if s.is_null() {
                format!("PAM error {rc}")
            } else {
                // SAFETY: non-NULL, NUL-terminated, static.
                unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
            }
        } else {
            said.join(" ")
        };
        Err(PamError {
            stage,
            code: rc,
            message,
        })
    }
}

impl std::fmt::Debug for Pam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pam")
            .field("session_open", &self.session_open)
            .finish_non_exhaustive()
    }
}

impl Drop for Pam {
    fn drop(&mut self) {
        // SAFETY: the handle is live; pam_end is its last use.
        unsafe {
            if self.session_open {
                raw::pam_close_session(self.handle, PAM_SILENT);
                raw::pam_setcred(self.handle, PAM_DELETE_CRED | PAM_SILENT);
            }
            raw::pam_end(self.handle, PAM_SUCCESS);
            // libpam holds no pointer to these after pam_end.
            drop(Box::from_raw(self.conv));
            drop(Box::from_raw(self.said));
        }
    }
}

fn start_error(message: String) -> PamError {
    PamError {
        stage: "start",
        code: -1,
        message,
    }
}

/// The conversation: keeps what modules say (errors and notices), answers no prompt.
extern "C" fn converse(
    num_msg: c_int,
    msg: *mut *mut PamMessage,
    resp: *mut *mut PamResponse,
    data: *mut c_void,
) -> c_int {
    let Ok(n) = usize::try_from(num_msg) else {
        return PAM_CONV_ERR;
    };
    if msg.is_null() || resp.is_null() || data.is_null() {
        return PAM_CONV_ERR;
    }
    // SAFETY: `data` is the `Vec<String>` boxed in `Pam`, alive for the transaction; `msg`
    // points to `num_msg` message pointers (Linux-PAM's layout), each valid for this call.
    let said = unsafe { &mut *(data as *mut Vec<String>) };
    for i in 0..n {
        // SAFETY: as above.
        let m = unsafe { *msg.add(i) };
        if m.is_null() {
            return PAM_CONV_ERR;
        }
        // SAFETY: a valid message for this call.
        let (style, text) = unsafe { ((*m).msg_style, (*m).msg) };
        match style {
            PAM_ERROR_MSG | PAM_TEXT_INFO => {
                if !text.is_null() && said.len() < MAX_MESSAGES {
                    // SAFETY: a NUL-terminated string valid for this call.
                    let t = unsafe { CStr::from_ptr(text as *const c_char) }.to_string_lossy();
                    said.push(t.chars().take(MAX_MESSAGE).collect());
                }
            }
            // A prompt: nobody is there to answer it.
            _ => return PAM_CONV_ERR,
        }
    }
    // The caller frees the responses: allocate them as libpam expects, zeroed (no text).
    // SAFETY: calloc of n response structs; NULL is handled.
    let r = unsafe { libc::calloc(n.max(1), std::mem::size_of::<PamResponse>()) };
    if r.is_null() {
        return PAM_BUF_ERR;
    }
    // SAFETY: `resp` is a valid out-pointer for this call.
    unsafe { *resp = r.cast() };
    PAM_SUCCESS
}
